"""The label and flag tables: network order, seed bit values, and the README table generated from the same facts."""
import re
from pathlib import Path

import pytest

from astra_thepayne.core.labels import LABEL_NAMES, RESULT_FLAGS, flag_result, label_pairs


def test_labels_in_the_payne_network_order():
    assert LABEL_NAMES[:4] == ("teff", "logg", "v_turb", "c_h") and LABEL_NAMES[-3:] == ("ge_h", "c12_c13", "v_macro")
    assert len(LABEL_NAMES) == 25 and len(set(LABEL_NAMES)) == 25
    pairs = label_pairs()
    assert len(pairs) == 300 and pairs[0] == ("teff", "logg") and pairs[-1] == ("c12_c13", "v_macro")


def test_seed_bit_values_are_kept():
    seed = {f.name: f.value for f in RESULT_FLAGS if f.bit < 5}
    assert seed == {"fitting_failure": 1, "warn_teff": 2, "warn_logg": 4, "warn_fe_h": 8, "low_snr": 16}
    values = [f.value for f in RESULT_FLAGS]
    assert len(set(values)) == len(values)  # no bit used twice


@pytest.mark.parametrize("labels, snr, expected", [
    ({"teff": 5000, "logg": 3, "fe_h": 0}, 100, 0),
    ({"teff": 3050, "logg": 3, "fe_h": 0}, 100, 2),
    ({"teff": 7950, "logg": 5.3, "fe_h": -1.45}, 100, 2 | 4 | 8),
    ({"teff": 5000, "logg": 0.05, "fe_h": 0.45}, 69.9, 4 | 8 | 16),
    ({"teff": 5000, "logg": 3, "fe_h": 0}, float("nan"), 16),
])
def test_flags_fire_exactly_on_their_thresholds(labels, snr, expected):
    assert flag_result(labels, snr) == expected


def test_readme_flag_table_matches_the_flag_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| (\d+) \| `(\w+)` \|", readme, re.M)
    assert [(int(bit), int(value), name) for bit, value, name in rows] == [
        (f.bit, f.value, f.name) for f in RESULT_FLAGS]
