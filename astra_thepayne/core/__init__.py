"""The science core: labels, wavelength grids, the spectrum object, the emulator, spectrum preparation, the fit.

Pure numpy and scipy. Nothing here imports the database layer, the readers, the pipeline or the command line
(``tests/unit/test_architecture.py`` checks it): the core takes arrays and returns arrays and results.

* :mod:`.labels` the labels, their units and the result flag bits; :mod:`.wavelength` the APOGEE grids;
  :mod:`.spectrum` the spectrum object readers make;
* :mod:`.emulator` the network, :mod:`.safe_pickle` the restricted unpickler its files are read with,
  :mod:`.demo_network` the bundled demonstration network;
* :mod:`.pixel_weights` and :mod:`.preprocess` a spectrum onto the model pixels with its weights, :mod:`.continuum`
  its normalisation;
* :mod:`.model_bank` the global start, :mod:`.problem` one spectrum's least-squares problem, :mod:`.lockstep` the
  driver that serves many fits' products at once, :mod:`.solver` the bounded solver, :mod:`.fitting` all of it
  together, :mod:`.result` what a fit returns;
* :mod:`.synthetic` spectra drawn from a known network: the ground truth of the tests.
"""
