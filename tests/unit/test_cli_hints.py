"""One-line hints of the fitting commands."""
import pytest

from astra_thepayne.cli.options import single_process_hint


def test_a_gpu_run_with_one_process_is_told_to_use_workers():
    hint = single_process_hint("run", "cuda:1", 1)
    assert hint.startswith("thepayne run: --device cuda:1 with one process") and "--processes " in hint
    assert "\n" not in hint


@pytest.mark.parametrize("device, processes", [("cuda", 8), ("cpu", 1), ("numpy", 1), (None, 1)])
def test_nothing_to_say_otherwise(device, processes):
    assert single_process_hint("fit", device, processes) is None
