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

from tokenizer import (  # noqa: E402
    ActionTokenizer, build_text_tokenizer, empty_piece_id, load_text_tokenizer, normalize_actions, resolve_unnorm_key,
    training_example, unnormalize_actions,
)


@pytest.fixture(scope="session")
def fixture_tokenizer():
    return load_text_tokenizer(FIXTURE)


def test_text_tokenizer_matches_reference_encodings(expected, fixture_tokenizer):
    tok = fixture_tokenizer
    ids = expected["tokenizer_checks"]["ids"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size, len(tok)) == (
        ids["bos"], ids["eos"], ids["pad"], ids["vocab_size"], ids["len_tokenizer"])
    assert empty_piece_id(tok) == 29871
    for enc in expected["tokenizer_checks"]["encodings"]:
        got = tok(enc["text"]).input_ids
        assert got == enc["input_ids"], enc["text"]
        assert tok.decode(got, skip_special_tokens=True) == enc["decoded_skip_special"]


def test_action_tokenizer_encode_decode_edges(expected):
    at = ActionTokenizer()
    assert at.begin_idx == 31743
    np.testing.assert_array_equal(at.bin_centers, np.load(FIXTURE / "action_bin_centers.npy"))
    for probe in expected["action_detokenization"]["probe"]:
        assert at.decode(probe["token_id"]) == probe["normalized"], probe
    # np.digitize on the 256 linspace edges: -1 -> 31999, 0 -> 31872, 1 (and beyond) -> 31744
    assert at.encode([-1.0, 0.0, 1.0, 1.3, -7.0]).tolist() == [31999, 31872, 31744, 31744, 31999]
    # a bin center encodes back to its own token, for every one of the 255 centers
    ids = np.arange(31745, 32000)
    np.testing.assert_array_equal(at.encode(at.decode(ids)), ids)


def test_training_example_ids_and_labels(expected, fixture_tokenizer):
    at = ActionTokenizer()
    for ex in expected["training"]["examples"]:
        input_ids, labels = training_example(fixture_tokenizer, at, ex["instruction_lowercased"], ex["normalized_action_in"])
        assert input_ids == ex["input_ids"] and labels == ex["labels"]
        assert at.encode(ex["normalized_action_in"]).tolist() == ex["action_token_ids"]


def test_normalization_round_trip_and_mask():
    stats = {"q01": [-1.0, 0.0, 2.0], "q99": [1.0, 4.0, 2.0], "min": [-2.0, -1.0, 2.0], "max": [2.0, 5.0, 2.0],
             "mask": [True, True, False]}
    a = np.array([[0.5, 1.0, 0.7], [-3.0, 9.0, 1.0]])
    n = normalize_actions(a, stats)
    # dim 0,1 q01/q99 scaled and clipped; dim 2 has min == max -> 0 regardless of mask
    np.testing.assert_allclose(n, [[0.5, -0.5, 0.0], [-1.0, 1.0, 0.0]], atol=1e-7)
    back = unnormalize_actions(n[0], {"k": {"action": stats}}, "k")
    np.testing.assert_allclose(back[:2], a[0, :2], atol=1e-7)
    assert back[2] == 0.0  # masked dims pass through un-normalization unchanged


def test_unnorm_key_resolution_errors():
    stats = {"a": {}, "b": {}}
    with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
        resolve_unnorm_key(stats, None)
    with pytest.raises(ValueError, match="unknown unnorm_key 'c'"):
        resolve_unnorm_key(stats, "c")
    assert resolve_unnorm_key({"only": {}}, None) == "only"


def test_built_tokenizer_has_llama2_id_layout():
    tok = build_text_tokenizer()
    assert (tok.vocab_size, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (32000, 32001, 32000, 1, 2)
    assert empty_piece_id(tok) == 29871 and tok("\n", add_special_tokens=False).input_ids == [29871, 13]
    ids = tok("move to the red block?\nOut: ").input_ids
    assert ids[0] == 1 and ids[-1] == 29871 and tok.decode(ids, skip_special_tokens=True) == "move to the red block?\nOut: "
    action_ids = list(range(31744, 32000))  # action tokens are single characters that survive decode -> encode
    assert tok(tok.decode(action_ids), add_special_tokens=False).input_ids == [29871] + action_ids  # + prepended "▁"


# ---- model.py -----------------------------------------------------------------------------------------------------


# ---- data.py ------------------------------------------------------------------------------------------------------


# ---- train.py -----------------------------------------------------------------------------------------------------


# ---- finetune.py --------------------------------------------------------------------------------------------------


# ---- serve.py -----------------------------------------------------------------------------------------------------
