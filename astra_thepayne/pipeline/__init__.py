"""The pipeline: the task, its runners, and everything a survey run does around the fit.

* :mod:`.task` the task body (inputs to result rows); :mod:`.fitter` loading the network and fitter (for the task
  and ``thepayne fit``, without the database); :mod:`.astra_binding` the same task under Astra's ``@task`` with
  Astra's result model, built on first use when sdss-astra is importable; :mod:`.astra_setup` Astra's tables;
* :mod:`.runner` saving a task's rows in batches, timed as Astra times them; :mod:`.work_queue` ``thepayne run``,
  the claimed batches of pending spectra;
* :mod:`.ingest` registering files; :mod:`.slurm` scale-out on SLURM;
* :mod:`.catalogue` summary tables, :mod:`.products` per-star files, :mod:`.report` the HTML report,
  :mod:`.plotting` fit plots, :mod:`.noise_model` repeat-visit error calibration, :mod:`.demo` ``thepayne demo``.
"""
