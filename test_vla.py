"""nanoVLA tests: tiny, offline, CPU. Run with `python -m pytest -q test_vla.py`.

Sections follow the pipeline: tokenizer, model (against ../shared/fixtures/openvla-tiny), data, train, finetune, serve.
"""

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
FIXTURE = SHARED / "fixtures" / "openvla-tiny"


@pytest.fixture(scope="session")
def expected():
    return json.loads((FIXTURE / "expected.json").read_text())


# ---- tokenizer.py -------------------------------------------------------------------------------------------------


# ---- model.py -----------------------------------------------------------------------------------------------------


# ---- data.py ------------------------------------------------------------------------------------------------------


# ---- train.py -----------------------------------------------------------------------------------------------------


# ---- finetune.py --------------------------------------------------------------------------------------------------


# ---- serve.py -----------------------------------------------------------------------------------------------------
