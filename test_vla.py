"""nanoVLA tests: tiny, offline, CPU. Run with `python -m pytest -q test_vla.py`.

Sections follow the pipeline: tokenizer, model (against ../shared/fixtures/openvla-tiny), data, train, finetune, serve.
"""

import base64
import contextlib
import copy
import hashlib
import http.client
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import json_numpy
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data
import demo
import finetune
import oft
import oxe
import serve
import train
from checkpoint import (
    CheckpointError, build_from_components, hf_config, load_text_tokenizer, read_config, read_tensor,
    read_weight_headers,
)
from model import CONFIGS, VLA, to_pixel_values
from tokenizer import (
    ActionTokenizer, build_text_tokenizer, empty_piece_id, normalize_actions, resolve_unnorm_key, training_example,
    unnormalize_actions,
)

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
FIXTURE = SHARED / "fixtures" / "openvla-tiny"


@pytest.fixture(scope="session")
def expected():
    return json.loads((FIXTURE / "expected.json").read_text())


# ---- tokenizer.py -------------------------------------------------------------------------------------------------

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
        input_ids, labels = training_example(fixture_tokenizer, at, ex["instruction_lowercased"],
                                             ex["normalized_action_in"])
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
    assert (tok.vocab_size, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (32000, 32001, 32000,
                                                                                                 1, 2)
    assert empty_piece_id(tok) == 29871 and tok("\n", add_special_tokens=False).input_ids == [29871, 13]
    ids = tok("move to the red block?\nOut: ").input_ids
    assert ids[0] == 1 and ids[-1] == 29871
    assert tok.decode(ids, skip_special_tokens=True) == "move to the red block?\nOut: "
    action_ids = list(range(31744, 32000))  # action tokens are single characters that survive decode -> encode
    assert tok(tok.decode(action_ids), add_special_tokens=False).input_ids == [29871] + action_ids  # + prepended "▁"


# ---- model.py -----------------------------------------------------------------------------------------------------

def logit_tol(ref):  # the fixture README's tolerance: 1e-4 x max(1, max |reference|)
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def assert_statistics(got, ref):
    """The data fixtures' tolerance: counts and masks exact, floats rtol 1e-5, atol 1e-6 (numpy's float32 sums are
    ordered by the CPU's SIMD width: AVX2 and AVX-512 machines differ in the last bit)."""
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        if isinstance(value, dict):
            assert_statistics(got[key], value)
        elif np.asarray(value).dtype.kind in "biu":
            assert got[key] == value, key
        else:
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.fixture(scope="session")
def fixture_vla():
    return VLA.from_pretrained(FIXTURE, dtype=torch.float32)


def fixture_image(case):
    return np.load(FIXTURE / case["image"]["file"])


def case_inputs(vla, case):
    """What predict_action feeds the model for a fixture case (the case's own prompt: case 4 is not lower-cased)."""
    ids = vla.tokenizer(case["prompt"]).input_ids
    return ids, (ids if ids[-1] == 29871 else ids + [29871])


def test_fixture_cases_ids_pixels_logits_tokens_actions(expected, fixture_vla):
    vla = fixture_vla
    for case in expected["cases"]:
        image = fixture_image(case)
        ids, model_ids = case_inputs(vla, case)
        assert ids == case["processor_input_ids"] and model_ids == case["model_input_ids"], case["name"]
        resized = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC))
        assert hashlib.sha256(resized.tobytes()).hexdigest() == case["resized_224_uint8_sha256"]
        pixel_values = vla.preprocess([image])
        pv = case["pixel_values"]
        assert list(pixel_values.shape) == pv["shape"]
        assert hashlib.sha256(pixel_values.numpy().astype("<f4").tobytes()).hexdigest() == pv["sha256_f32_le"]
        for sample in pv["samples"]:
            assert abs(pixel_values[tuple(sample["index"])].item() - sample["value"]) <= 1e-6
        # first greedy step: logits at the last prompt position
        with torch.no_grad():
            logits = vla(pixel_values, torch.tensor([model_ids])).logits[0, -1].numpy()
        ref = np.load(FIXTURE / case["last_position_logits"]["file"])
        assert np.abs(logits - ref).max() <= logit_tol(ref), case["name"]
        assert int(logits.argmax()) == case["last_position_logits"]["argmax"]
        # every greedy step: logits over the 256 action ids, teacher-forced on the generated tokens
        generated = case["generated_token_ids"]
        with torch.no_grad():
            step_logits = vla(pixel_values, torch.tensor([model_ids + generated[:-1]])).logits[0, -7:, 31744:32000]
        ref_steps = np.load(FIXTURE / case["generation_step_logits_file"])
        assert np.abs(step_logits.numpy() - ref_steps).max() <= logit_tol(ref_steps), case["name"]
        # cached greedy decoding reproduces the generated ids; actions equal the recorded ones
        got = vla.generate(pixel_values, [model_ids], 7)[0].tolist()
        assert got == generated, case["name"]
        normalized = vla.action_tokenizer.decode(got)
        np.testing.assert_array_equal(normalized, case["normalized_actions"])
        if case["lowercased"]:
            action = vla.predict_action(image, case["instruction"], unnorm_key=case["unnorm_key"])
            assert action.shape == (7,) and action.dtype == np.float64
            np.testing.assert_allclose(action, case["actions"], rtol=0, atol=1e-6)


def test_fixture_intermediate_features(expected, fixture_vla):
    vla, case = fixture_vla, expected["cases"][0]
    files = case["intermediates"]
    pixel_values = vla.preprocess([fixture_image(case)])
    dino, siglip = pixel_values.split(3, dim=1)
    with torch.no_grad():
        got = {"dino_patch_features": vla.vision_backbone.featurizer(dino),
               "siglip_patch_features": vla.vision_backbone.fused_featurizer(siglip),
               "projector_features": vla.projector(vla.vision_backbone(pixel_values))}
    for name, tensor in got.items():
        ref = np.load(FIXTURE / files[name])
        out = tensor.numpy().reshape(ref.shape)
        assert np.abs(out - ref).max() <= logit_tol(ref), name


@pytest.mark.parametrize("name", ["single_a", "single_b", "batch_ab"])
def test_fixture_training_loss_accuracy_l1(expected, fixture_vla, name):
    vla, t = fixture_vla, expected["training"][name]
    ids = torch.tensor(t["batch_input_ids"])
    labels = torch.tensor(t["batch_labels"])
    mask = torch.tensor(t["attention_mask"]) if "attention_mask" in t else (ids != 32000).long()
    cases = [expected["cases"][ex["case"]] for ex in expected["training"]["examples"]]
    images = [fixture_image(c) for c in (cases if name == "batch_ab" else [cases[name == "single_b"]])]
    with torch.no_grad():  # with labels: logits (N, V) only where the next token is supervised, and their loss
        sup = vla(vla.preprocess(images), ids, attention_mask=mask, labels=labels)
        out = vla(vla.preprocess(images), ids, attention_mask=mask)  # every position
    assert abs(sup.loss.item() - t["loss"]) <= 1e-5 * abs(t["loss"])
    keep = labels[:, 1:] != -100
    assert torch.allclose(sup.logits, out.logits[:, vla.num_patches:-1][keep], atol=1e-5)
    # metrics as the original's finetune.py: logits[:, P:-1] against labels[:, 1:], action positions = labels > 31743
    preds = out.logits[:, vla.num_patches:-1].argmax(-1)
    gt = labels[:, 1:]
    action = gt > vla.action_tokenizer.begin_idx
    accuracy = ((preds == gt) & action).sum().item() / action.sum().item()
    assert accuracy == t["action_accuracy"]
    decode = vla.action_tokenizer.decode
    l1 = np.abs(decode(preds[action].numpy()) - decode(gt[action].numpy())).mean()
    assert abs(l1 - t["action_l1_loss"]) <= 1e-9
    ce = torch.nn.functional.cross_entropy(sup.logits, gt[keep], reduction="none")
    # Per-token CE within what the logits' tolerance allows, not the README's 1e-5 relative: CE = logsumexp(z) - z_y
    # moves by at most 2 max|dz|, and logits agree to 1e-4 x max|logit| (which CPU kernel sums them shows here: 1.4e-4
    # on an AVX2 machine, 6e-5 on AVX-512). The batch loss meets 1e-5 relative.
    ce_tol = 2 * logit_tol(sup.logits.numpy())
    np.testing.assert_allclose(ce.numpy(), np.concatenate(t["per_token_ce"]), rtol=0, atol=ce_tol)


def test_llama_matches_transformers_oracle():
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM as HFLlama

    cfg = CONFIGS["tiny"].llm
    hf = HFLlama(HFLlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                               intermediate_size=cfg.intermediate_size,
                               num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                               num_key_value_heads=2, rms_norm_eps=cfg.rms_norm_eps, attn_implementation="sdpa")).eval()
    vla = VLA(replace(CONFIGS["tiny"], llm=replace(cfg, num_key_value_heads=2))).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
        # same names under language_model.: a strict load of transformers' state dict
        missing = vla.language_model.load_state_dict(hf.state_dict(), strict=True)
        x = torch.randn(2, 13, cfg.hidden_size)
        pos = torch.arange(13)[None].expand(2, 13)
        ours = vla.language_model.lm_head(vla.language_model.model(x, pos))
        theirs = hf(inputs_embeds=x, position_ids=pos).logits
    assert not missing.missing_keys and torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_cached_equals_uncached_and_batched_equals_single(expected, fixture_vla):
    vla = fixture_vla
    cases = [c for c in expected["cases"] if c["lowercased"]]
    images = [fixture_image(c) for c in cases]
    prompts = [case_inputs(vla, c)[1] for c in cases]
    pixel_values = vla.preprocess(images)
    cached = vla.generate(pixel_values, prompts, 7)  # one left-padded batch
    for row, prompt in enumerate(prompts):  # the oracle: greedy over the whole sequence, one row at a time, no cache
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(7):
                ids.append(int(vla(pixel_values[row:row + 1], torch.tensor([ids])).logits[0, -1].argmax()))
        assert cached[row].tolist() == ids[len(prompt):]
    # rows of different prompt lengths in one left-padded batch equal their one-by-one results
    assert len({len(p) for p in prompts}) > 1
    batched = vla.predict_actions(images, [c["instruction"] for c in cases], [c["unnorm_key"] for c in cases])
    for row, case, image in zip(batched, cases, images):
        np.testing.assert_array_equal(row, vla.predict_action(image, case["instruction"], case["unnorm_key"]))
        np.testing.assert_allclose(row, case["actions"], atol=1e-6)


def test_actions_depend_on_image_and_unnorm_key_errors(fixture_vla):
    vla = fixture_vla
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(4)]
    actions = {tuple(vla.predict_action(image, "pick up the cup", "bridge_orig")) for image in images}
    assert len(actions) > 1  # the silent "ignores the image" failure would give one action for every image
    with pytest.raises(ValueError, match="bridge_orig"):
        vla.predict_action(np.zeros((64, 64, 3), np.uint8), "pick up the cup")  # two keys: must name one
    with pytest.raises(ValueError, match="uint8"):
        vla.predict_action(np.zeros((64, 64, 3), np.float32), "pick up the cup", "bridge_orig")
    with pytest.raises(ValueError, match="1 images and 2 instructions"):
        vla.predict_actions([np.zeros((64, 64, 3), np.uint8)], ["a", "b"], "bridge_orig")
    with pytest.raises(ValueError, match=">= 1"):
        vla.predict_actions([], [], "bridge_orig")


def released_7b_shapes() -> dict:
    """REFERENCE.md 1.4, transcribed by hand: every tensor of openvla/openvla-7b with its shape."""
    out = {}
    dino, sig = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."
    out.update({dino + "cls_token": (1, 1, 1024), dino + "reg_token": (1, 4, 1024), dino + "pos_embed": (1, 256, 1024),
                dino + "patch_embed.proj.weight": (1024, 3, 14, 14), dino + "patch_embed.proj.bias": (1024,),
                dino + "norm.weight": (1024,), dino + "norm.bias": (1024,)})
    for i in range(24):
        b = f"{dino}blocks.{i}."
        out.update({b + "norm1.weight": (1024,), b + "norm1.bias": (1024,), b + "attn.qkv.weight": (3072, 1024),
                    b + "attn.qkv.bias": (3072,), b + "attn.proj.weight": (1024, 1024), b + "attn.proj.bias": (1024,),
                    b + "ls1.scale_factor": (1024,), b + "norm2.weight": (1024,), b + "norm2.bias": (1024,),
                    b + "mlp.fc1.weight": (4096, 1024), b + "mlp.fc1.bias": (4096,), b + "mlp.fc2.weight": (1024, 4096),
                    b + "mlp.fc2.bias": (1024,), b + "ls2.scale_factor": (1024,)})
    out.update({sig + "pos_embed": (1, 256, 1152), sig + "patch_embed.proj.weight": (1152, 3, 14, 14),
                sig + "patch_embed.proj.bias": (1152,), sig + "norm.weight": (1152,), sig + "norm.bias": (1152,),
                sig + "attn_pool.latent": (1, 1, 1152)})
    for name, (rows, cols) in {"q": (1152, 1152), "kv": (2304, 1152), "proj": (1152, 1152), "norm": (1152, None),
                               "mlp.fc1": (4304, 1152), "mlp.fc2": (1152, 4304)}.items():
        out[f"{sig}attn_pool.{name}.weight"] = (rows, cols) if cols else (rows,)
        out[f"{sig}attn_pool.{name}.bias"] = (rows,)
    for i in range(27):
        b = f"{sig}blocks.{i}."
        out.update({b + "norm1.weight": (1152,), b + "norm1.bias": (1152,), b + "norm2.weight": (1152,),
                    b + "norm2.bias": (1152,), b + "attn.qkv.weight": (3456, 1152), b + "attn.qkv.bias": (3456,),
                    b + "attn.proj.weight": (1152, 1152), b + "attn.proj.bias": (1152,),
                    b + "mlp.fc1.weight": (4304, 1152), b + "mlp.fc1.bias": (4304,), b + "mlp.fc2.weight": (1152, 4304),
                    b + "mlp.fc2.bias": (1152,)})
    out.update({"projector.fc1.weight": (8704, 2176), "projector.fc1.bias": (8704,),
                "projector.fc2.weight": (4096, 8704), "projector.fc2.bias": (4096,),
                "projector.fc3.weight": (4096, 4096), "projector.fc3.bias": (4096,)})
    llm = "language_model."
    out.update({llm + "model.embed_tokens.weight": (32064, 4096), llm + "model.norm.weight": (4096,),
                llm + "lm_head.weight": (32064, 4096)})
    for i in range(32):
        b = f"{llm}model.layers.{i}."
        out.update({b + f"self_attn.{p}_proj.weight": (4096, 4096) for p in "qkvo"})
        out.update({b + "mlp.gate_proj.weight": (11008, 4096), b + "mlp.up_proj.weight": (11008, 4096),
                    b + "mlp.down_proj.weight": (4096, 11008), b + "input_layernorm.weight": (4096,),
                    b + "post_attention_layernorm.weight": (4096,)})
    return out


def test_openvla_7b_layout_and_config_json_match_the_release(tmp_path):
    """The real 7B can't be downloaded here; its layout can be checked without a byte of weights: our meta-built model
    against REFERENCE.md 1.4's names and shapes, a released-style config.json + sparse shards (headers, no data)
    through the loader's config path, and our config.json writer against REFERENCE.md 1.2's fields."""
    spec = released_7b_shapes()
    assert sum(int(np.prod(s)) for s in spec.values()) == 7_541_237_184  # REFERENCE.md's derived total
    with torch.device("meta"):
        vla = VLA(CONFIGS["openvla-7b"])
    assert {k: tuple(v.shape) for k, v in vla.state_dict().items()} == spec

    stats = {"bridge_orig": {"action": {"q01": [0.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}}
    released = {  # REFERENCE.md 1.2, field by field
        "arch_specifier": "no-align+fused-gelu-mlp", "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
        "hf_llm_id": "meta-llama/Llama-2-7b-hf", "image_resize_strategy": "resize-naive", "image_sizes": [224, 224],
        "llm_backbone_id": "llama2-7b-pure", "llm_max_length": 2048, "model_type": "openvla", "n_action_bins": 256,
        "norm_stats": stats, "output_projector_states": False, "pad_to_multiple_of": 64, "pad_token_id": 32000,
        "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064},
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None], "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
        "use_fused_vision_backbone": True, "vision_backbone_id": "dinosiglip-vit-so-224px",
    }
    config = replace(CONFIGS["openvla-7b"], norm_stats=stats)
    assert hf_config(config, "bfloat16") == released  # what save_pretrained writes for the 7B

    # three sparse bf16 shards (headers only, holes for the data) + index, as the converter's 7 GB sharding
    names = list(spec)
    shards = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
    for file, keys in shards.items():
        header, offset = {}, 0
        for k in keys:
            n = int(np.prod(spec[k])) * 2
            header[k] = {"dtype": "BF16", "shape": list(spec[k]), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header).encode()
        with open(tmp_path / file, "wb") as f:  # a sparse file: the data region is a hole, never written
            f.write(len(blob).to_bytes(8, "little") + blob)
            f.truncate(8 + len(blob) + offset)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (tmp_path / "config.json").write_text(json.dumps(released, sort_keys=True))
    headers = read_weight_headers(tmp_path)
    assert {k: h[2] for k, h in headers.items()} == spec
    got = read_config(tmp_path, headers)
    assert got == config and got.llm.rms_norm_eps == 1e-6  # absent text_config fields: transformers 4.40 defaults


def test_save_load_round_trip_layout_and_resharding(expected, fixture_vla, tmp_path):
    vla = fixture_vla
    bf16 = VLA.from_pretrained(FIXTURE, dtype=torch.bfloat16)
    out = tmp_path / "saved"
    bf16.save_pretrained(out, max_shard_bytes=4 * 2**20)  # re-sharded differently from the fixture's 4 shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shapes = {}
    for name in set(index["weight_map"].values()):
        with safe_open(out / name, "pt") as f:
            for key in f.keys():
                shapes[key] = (list(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype())
    assert shapes == {k: (v["shape"], v["dtype"]) for k, v in expected["weights_manifest"].items()}
    fixture_cfg = json.loads((FIXTURE / "config.json").read_text())
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg.pop("timm_overrides") == expected["construction"]["timm_overrides"]
    assert saved_cfg == fixture_cfg
    for name in ("preprocessor_config.json",):
        assert json.loads((out / name).read_text()) == json.loads((FIXTURE / name).read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (FIXTURE / name).read_bytes()
    # single-file layout loads too, and every reload gives identical outputs
    single = tmp_path / "single"
    VLA.from_pretrained(out, dtype=torch.bfloat16).save_pretrained(single)
    assert (single / "model.safetensors").exists() and not (single / "model.safetensors.index.json").exists()
    case = expected["cases"][0]
    image = fixture_image(case)
    want = vla.predict_action(image, case["instruction"], case["unnorm_key"])
    for path in (out, single):
        again = VLA.from_pretrained(path, dtype=torch.float32)
        for key, value in again.state_dict().items():
            assert torch.equal(value, vla.state_dict()[key]), key
        np.testing.assert_array_equal(again.predict_action(image, case["instruction"], case["unnorm_key"]), want)


def test_built_model_save_load_and_dataset_statistics(tmp_path):
    vla = VLA.build("tiny", seed=3)
    vla.config.norm_stats = json.loads((FIXTURE / "dataset_statistics.json").read_text())
    vla.save_pretrained(tmp_path / "m")
    stats = {"my_robot": vla.norm_stats["bridge_orig"]}
    (tmp_path / "m" / "dataset_statistics.json").write_text(json.dumps(stats))  # a fine-tuned run's statistics
    again = VLA.from_pretrained(tmp_path / "m")
    assert sorted(again.norm_stats) == ["bridge_orig", "libero_spatial_no_noops", "my_robot"]
    image = np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    want = vla.predict_action(image, "go", "bridge_orig")
    np.testing.assert_array_equal(again.predict_action(image, "go", "my_robot"), want)


def _broken_copy(tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(FIXTURE, dst)
    return dst


def _rewrite_shard(path, fn):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"]["projector.fc1.weight"]
    tensors = load_file(shard)
    fn(tensors, index)
    save_file(tensors, shard, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VLA.from_pretrained(tmp_path / "nope")
    p = _broken_copy(tmp_path, "no_config")
    (p / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        VLA.from_pretrained(p)
    p = _broken_copy(tmp_path, "no_shard")
    (p / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00003-of-00004.safetensors"):
        VLA.from_pretrained(p)
    p = _broken_copy(tmp_path, "no_weights")
    for f in p.glob("model*"):
        f.unlink()
    (p / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pickled weights are never loaded"):
        VLA.from_pretrained(p)
    p = _broken_copy(tmp_path, "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (p / name).unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        VLA.from_pretrained(p)

    def missing_key(t, index):
        del t["projector.fc1.bias"]
        del index["weight_map"]["projector.fc1.bias"]

    def unexpected_key(t, index):
        t["projector.fc9.weight"] = torch.zeros(2)
        index["weight_map"]["projector.fc9.weight"] = index["weight_map"]["projector.fc1.weight"]

    def wrong_shape(t, index):
        t["projector.fc1.bias"] = torch.zeros(7, dtype=torch.bfloat16)

    for fn, match in [(missing_key, r"missing 1 keys \['projector.fc1.bias'\]"),
                      (unexpected_key, r"unexpected 1 keys \['projector.fc9.weight'\]"),
                      (wrong_shape, r"projector.fc1.bias has shape \[7\], the model expects \[320\]")]:
        p = _broken_copy(tmp_path, fn.__name__)
        _rewrite_shard(p, fn)
        with pytest.raises(CheckpointError, match=match):
            VLA.from_pretrained(p)


def _edit_header(file, fn, length=None):
    """Rewrite a safetensors file's JSON header with fn(header), keeping its data bytes; length: a forged size."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header)
    blob = json.dumps(header).encode()
    file.write_bytes((length or len(blob)).to_bytes(8, "little") + blob + raw[8 + n:])


def test_corrupt_weight_headers_fail_naming_the_file(tmp_path):
    """Each header is validated before any read: a dtype whose size disagrees with the byte range, reversed or
    overlapping offsets, a forged 2^62-byte header length. Each once loaded silently (uninitialized memory)."""
    def f64(h):  # F64 with BF16-sized offsets: 8 bytes per element claimed, 2 stored
        h["projector.fc1.bias"]["dtype"] = "F64"

    def reversed_offsets(h):
        h["projector.fc1.bias"]["data_offsets"].reverse()

    def overlapping(h):
        h["projector.fc1.bias"]["data_offsets"] = h["projector.fc1.weight"]["data_offsets"]

    for fn, length in [(f64, None), (reversed_offsets, None), (overlapping, None), (lambda h: None, 2**62)]:
        p = _broken_copy(tmp_path, f"{fn.__name__}{length}")
        shard = p / json.loads((p / "model.safetensors.index.json").read_text())["weight_map"]["projector.fc1.bias"]
        _edit_header(shard, fn, length)
        with pytest.raises(CheckpointError, match=f"{shard}: not a valid safetensors file"):
            VLA.from_pretrained(p)


def test_malformed_config_files_fail_naming_the_file(tmp_path):
    """Unsupported values, wrong types and broken JSON give a CheckpointError naming the file and what was
    expected, not a traceback from deep inside the loader."""
    edit = lambda **kw: lambda text: json.dumps({**json.loads(text), **kw})  # noqa: E731
    cases = [("config.json", edit(vision_backbone_id="clip-vit-l"), "vision_backbone_id 'clip-vit-l' is not supported"),
             ("config.json", edit(arch_specifier="linear"), "arch_specifier 'linear' is not supported"),
             ("config.json", edit(n_action_bins="256"), r"config.json: n_action_bins is '256', expected int"),
             ("config.json", edit(norm_stats=[]), r"config.json: norm_stats is \[\], expected dict"),
             ("config.json", edit(text_config=[1]), r"config.json: text_config is \[1\], expected dict"),
             ("config.json", edit(timm_overrides=5), "config.json: timm_overrides is 5, expected dict"),
             ("config.json", edit(pad_to_multiple_of="x"), "config.json: pad_to_multiple_of is 'x', expected int"),
             ("config.json", edit(text_config={"hidden_size": "64"}), "text_config.hidden_size is '64', expected int"),
             ("config.json", lambda text: json.dumps([json.loads(text)]), "config.json: the top-level value is .*dict"),
             ("config.json", lambda text: text[: len(text) // 2], "config.json: not valid JSON"),
             ("dataset_statistics.json", lambda text: "[]", r"dataset_statistics.json: the top-level value is \[\]"),
             ("preprocessor_config.json", edit(tvf_normalize_params=None), "tvf_normalize_params is None, expected"),
             ("tokenizer.json", lambda text: text[:100], "tokenizer.json: not a readable tokenizer")]
    for i, (name, fn, match) in enumerate(cases):
        p = _broken_copy(tmp_path, f"case{i}")
        (p / name).write_text(fn((p / name).read_text()))
        with pytest.raises(CheckpointError, match=match):
            VLA.from_pretrained(p)


def test_build_from_timm_named_components(tmp_path, fixture_vla):
    """timm's names (LayerScale `gamma`, classifier head absent) and a Llama-2 HF directory map onto ours."""
    src = fixture_vla.state_dict()
    timm_states = []
    for prefix in ("vision_backbone.featurizer.", "vision_backbone.fused_featurizer."):
        sd = {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix)}
        timm_states.append({k.removesuffix("scale_factor") + "gamma" if k.endswith("scale_factor") else k: v
                            for k, v in sd.items()})
    assert any(k.endswith("ls1.gamma") for k in timm_states[0])
    llama = tmp_path / "llama2"
    llama.mkdir()
    lm = {k[len("language_model."):]: v[:32000].clone() if "embed" in k or "lm_head" in k else v.clone()
          for k, v in src.items() if k.startswith("language_model.")}
    save_file(lm, llama / "model.safetensors", metadata={"format": "pt"})
    (llama / "config.json").write_text(json.dumps({"rms_norm_eps": 1e-5}))
    shutil.copy(FIXTURE / "tokenizer.json", llama)
    shutil.copy(FIXTURE / "tokenizer_config.json", llama)
    vla = build_from_components(CONFIGS["tiny"], timm_states, llama, dtype=torch.float32)
    assert vla.config.llm.rms_norm_eps == 1e-5  # training used Llama-2's own eps
    for key, value in vla.state_dict().items():
        if key.startswith("vision_backbone."):
            assert torch.equal(value, src[key]), key
        elif key.startswith("language_model."):
            assert torch.equal(value[: lm[key[15:]].shape[0]], lm[key[15:]]), key
    bad = [dict(timm_states[0], **{"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}), timm_states[1]]
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight"):
        build_from_components(CONFIGS["tiny"], bad, llama)


def test_bf16_model_runs_and_matches_fp32_tokens(expected, fixture_vla):
    vla = VLA.from_pretrained(FIXTURE, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in vla.parameters())
    case = expected["cases"][4]  # the largest greedy gap: bf16 compute still picks the same first token
    ids = case_inputs(vla, case)[1]
    first = vla.generate(vla.preprocess([fixture_image(case)]), [ids], 1)[0, 0].item()
    assert first == case["generated_token_ids"][0]


# ---- data.py ------------------------------------------------------------------------------------------------------

GOLDEN = SHARED / "data" / "golden" / "bridge_orig"
BRIDGE_SAMPLE = SHARED / "data" / "bridge_dataset" / "1.0.0"


def _bridge_features(F, size, state=True):
    """bridge_orig's real feature names and dtypes (shared/data/bridge_dataset/1.0.0/features.json), small images."""
    image = F.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format="jpeg")
    return {
        "steps": F.Dataset({
            "observation": F.FeaturesDict({**{f"image_{k}": image for k in range(4)},
                                           **({"state": F.Tensor(shape=(7,), dtype=np.float32)} if state else {})}),
            "action": F.Tensor(shape=(7,), dtype=np.float32), "language_instruction": F.Text(),
            "language_embedding": F.Tensor(shape=(512,), dtype=np.float32), "reward": F.Scalar(dtype=np.float32),
            "discount": F.Scalar(dtype=np.float32), "is_first": F.Scalar(dtype=np.bool_),
            "is_last": F.Scalar(dtype=np.bool_), "is_terminal": F.Scalar(dtype=np.bool_)}),
        "episode_metadata": F.FeaturesDict({"file_path": F.Text(), "episode_id": F.Scalar(dtype=np.int32),
                                            **{f"has_image_{k}": F.Scalar(dtype=np.bool_) for k in range(4)},
                                            "has_language": F.Scalar(dtype=np.bool_)}),
    }


def _libero_features(F, size):
    """OpenVLA's regenerated LIBERO (*_no_noops) feature names and dtypes, small images."""
    image = F.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format="jpeg")
    return {
        "steps": F.Dataset({
            "observation": F.FeaturesDict({"image": image, "wrist_image": image,
                                           "state": F.Tensor(shape=(8,), dtype=np.float32),
                                           "joint_state": F.Tensor(shape=(7,), dtype=np.float32)}),
            "action": F.Tensor(shape=(7,), dtype=np.float32), "language_instruction": F.Text(),
            "reward": F.Scalar(dtype=np.float32), "discount": F.Scalar(dtype=np.float32),
            "is_first": F.Scalar(dtype=np.bool_), "is_last": F.Scalar(dtype=np.bool_),
            "is_terminal": F.Scalar(dtype=np.bool_)}),
        "episode_metadata": F.FeaturesDict({"file_path": F.Text()}),
    }


def _solid(value, size=16):
    return np.full((size, size, 3), value, np.uint8)


def _bridge_episode(rng, i, T, instruction):
    gripper = rng.choice([0.0, 1.0, 0.5, 0.02, 0.97, 0.3], size=T).astype(np.float32)  # decided and in-between values
    state = rng.normal(size=(T, 7)).astype(np.float32)
    steps = [{"observation": {**{f"image_{k}": _solid((20 * t, 10 * i, 40 * k)) for k in range(4)}, "state": state[t]},
              "action": np.r_[rng.normal(size=6), gripper[t]].astype(np.float32), "language_instruction": instruction,
              "language_embedding": np.zeros(512, np.float32), "reward": 0.0, "discount": 1.0,
              "is_first": t == 0, "is_last": t == T - 1, "is_terminal": t == T - 1} for t in range(T)]
    meta = {"file_path": f"ep{i}", "episode_id": i, **{f"has_image_{k}": True for k in range(4)}, "has_language": True}
    return {"steps": steps, "episode_metadata": meta}


def _libero_episode(rng, i, T):
    steps = [{"observation": {"image": _solid((20 * t, 10 * i, 0)), "wrist_image": _solid(0),
                              "state": rng.normal(size=8).astype(np.float32), "joint_state": np.zeros(7, np.float32)},
              "action": np.r_[rng.normal(size=6), rng.uniform(-1, 1)].astype(np.float32),
              "language_instruction": f"libero task {i}", "reward": 0.0, "discount": 1.0,
              "is_first": t == 0, "is_last": t == T - 1, "is_terminal": t == T - 1} for t in range(T)]
    return {"steps": steps, "episode_metadata": {"file_path": f"ep{i}"}}


@pytest.fixture(scope="module")
def rlds_root(tmp_path_factory):
    """Tiny bridge_orig (train + val, one unlabeled episode) and libero_spatial_no_noops (train only) datasets."""
    import tensorflow_datasets as tfds

    root, rng, F = tmp_path_factory.mktemp("rlds"), np.random.default_rng(0), tfds.features
    train = [_bridge_episode(rng, i, int(rng.integers(4, 9)), f"put block {i} in the bowl" if i != 3 else "")
             for i in range(8)]
    val = [_bridge_episode(rng, 100 + i, 5, f"val task {i}") for i in range(2)]
    data.write_rlds(root, "bridge_orig", _bridge_features(F, 16), {"train": train, "val": val})
    libero = [_libero_episode(rng, i, int(rng.integers(3, 7))) for i in range(20)]
    data.write_rlds(root, "libero_spatial_no_noops", _libero_features(F, 16), {"train": libero})
    return root, {"train": train, "val": val, "libero": libero}


def _episodes(builder, name, split):
    return [ep for _, ep in data.read_episodes(builder, name, split)]


def _linked(root, version_dir, name):
    """root/name/<version> linking the fixture's files: the statistics cache is written next to them, not shared."""
    (root / name / version_dir.name).mkdir(parents=True)
    for f in version_dir.iterdir():
        (root / name / version_dir.name / f.name).symlink_to(f)
    return root


def test_data_golden_bridge_statistics_frames_tokens(tmp_path, fixture_tokenizer):
    """The real BridgeData sample read as bridge_orig reproduces the original pipeline's golden outputs."""
    gold = json.loads((GOLDEN / "expected.json").read_text())
    ds = data.RLDSDataset(_linked(tmp_path, BRIDGE_SAMPLE, "bridge_orig"), "bridge", fixture_tokenizer, train=False,
                          split="train", shuffle_buffer_size=0)
    stats = ds.norm_stats["bridge_orig"]
    ref = json.loads((GOLDEN / "dataset_statistics.json").read_text())["bridge_orig"]
    assert_statistics(stats, ref)
    assert (stats["num_transitions"], stats["num_trajectories"]) == (400, 50)
    assert len(list((tmp_path / "bridge_orig" / "1.0.0").glob("dataset_statistics_*.json"))) == 1  # the cache file

    raw = np.concatenate([ep["action"] for ep in _episodes(ds.builders[0], "bridge_orig", "train")])
    np.testing.assert_allclose(raw, np.load(GOLDEN / "actions_raw.npy"), atol=1e-6)
    frames = list(ds.frames())
    assert len(frames) == gold["frames"]["count"] == 200
    np.testing.assert_allclose(np.stack([f["action"] for f in frames]), np.load(GOLDEN / "actions_normalized.npy"),
                               atol=1e-6)
    assert [ds.action_tokenizer.encode(f["action"]).tolist() for f in frames] == gold["frames"]["all_action_token_ids"]
    assert [hashlib.sha256(f["image"].tobytes()).hexdigest() for f in frames] == gold["frames"]["all_image_sha256"]
    assert [f["instruction"] for f in frames[::8]] == gold["frames"]["trajectory_instructions"]
    batch = data.collate([ds.example(f) for f in frames])
    for key in ("input_ids", "labels", "attention_mask"):
        np.testing.assert_array_equal(batch[key].numpy(), np.load(GOLDEN / f"batch_all_{key}.npy"))
    assert batch["pixel_values"].shape == (200, 6, 224, 224) and batch["pixel_values"].dtype == torch.float32


OXE = SHARED / "data" / "oxe"
OXE_GOLDEN = sorted(p.name for p in (OXE / "golden").iterdir() if p.is_dir())


@pytest.mark.parametrize("name", OXE_GOLDEN)
def test_data_oxe_golden_statistics_frames_tokens(name, fixture_tokenizer, tmp_path):
    """Each OXE fixture dataset through the public API reproduces what the original pipeline made of it."""
    gold, golden = json.loads((OXE / "golden" / name / "expected.json").read_text()), OXE / "golden" / name
    counts, detail = gold["counts"], gold["frames"]["detail"]
    root = _linked(tmp_path, next((OXE / "rlds" / name).iterdir()), name)
    ds = data.RLDSDataset(root, name, fixture_tokenizer, train=False, split=counts["train_split"],
                          shuffle_buffer_size=0)  # the last episode of several splits is unlabeled
    stats, ref = ds.norm_stats[name], json.loads((golden / "dataset_statistics.json").read_text())[name]
    assert_statistics(stats, ref)
    assert ds.dataset_length == counts["rlds_dataset_length"]
    frames = list(ds.frames())
    assert [f["instruction"] for f in frames] == [d["language_instruction"] for d in detail]
    np.testing.assert_allclose(np.stack([f["action"] for f in frames]), np.load(golden / "actions_normalized.npy"),
                               atol=1e-6)
    assert [ds.action_tokenizer.encode(f["action"]).tolist() for f in frames] == [d["action_token_ids"] for d in detail]
    for f, d in zip(frames, detail):  # DROID: either exterior camera, the same one for a whole trajectory
        digest = hashlib.sha256(f["image"].tobytes()).hexdigest()
        assert digest in d.get("image_sha256_candidates", {d["image_key"]: d["image_sha256"]}).values()
    batch = data.collate([ds.example(f) for f in frames])
    assert [ids[m].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])] == \
        [d["input_ids"] for d in detail]
    episodes = _episodes(ds.builders[0], name, counts["train_split"])
    raw = np.concatenate([ep["action"] for ep in episodes if any(ep["instruction"])])
    np.testing.assert_allclose(raw, np.load(golden / "actions_raw.npy"), atol=1e-6)
    rows = [d["raw_index"] for d in detail]  # proprio as the config's state keys load it, per yielded frame
    np.testing.assert_allclose(batch["proprio"].numpy(), np.load(golden / "proprio_raw.npy")[rows], atol=1e-6)


def test_data_layouts_without_fixture_follow_the_original():
    """language_table and bc_z (not in the fixture): the original transforms.py's arithmetic, written out by hand."""
    T, rng, img = 4, np.random.default_rng(0), np.array([b"x"] * 4, dtype=object)
    f = lambda *shape: rng.normal(size=(T, *shape)).astype(np.float32)  # noqa: E731
    text = np.array([[ord(c) for c in "push it"] + [0] * 505] * T, np.int32)  # unicode code points, zero-padded
    steps = {"observation": {"rgb": img, "effector_translation": f(2), "instruction": text}, "action": f(2)}
    out = data.standardize("language_table", {"steps": steps}, "language_table")
    np.testing.assert_array_equal(out["action"], np.c_[steps["action"], np.zeros((T, 4)), np.ones(T)])  # always open
    assert list(out["instruction"]) == [b"push it"] * T and out["proprio"].shape == (T, 8)
    obs = {"image": img, "natural_language_instruction": img, "present/xyz": f(3), "present/axis_angle": f(3),
           "present/sensed_close": f(1)}  # feature names with "/" in them
    act = {"future/xyz_residual": f(30), "future/axis_angle_residual": f(30), "future/target_close": np.eye(T, 10)}
    out = data.standardize("bc_z", {"steps": {"observation": obs, "action": act}}, "bc_z")
    np.testing.assert_array_equal(out["action"], np.c_[act["future/xyz_residual"][:, :3],
                                                        act["future/axis_angle_residual"][:, :3], 1 - np.eye(T)[:, 0]])
    np.testing.assert_array_equal(out["proprio"][:, 6], 0)  # the config's None: a zero column


def test_data_golden_augmentation_is_exact():
    gold = json.loads((GOLDEN / "expected.json").read_text())["augmentation"]["seeded_cases"]["cases"]
    image = np.load(GOLDEN / "frame0_image_224_uint8.npy")
    for case in gold:
        out = data.augment_image(image, case["seed"]).numpy()
        np.testing.assert_array_equal(out, np.load(GOLDEN / case["file"]))
    assert not np.array_equal(data.augment_image(image, [0, 1]).numpy(), data.augment_image(image, [0, 2]).numpy())


def test_data_standardization_bridge_libero(rlds_root):
    root, eps = rlds_root
    bridge = data.open_dataset(root, "bridge_orig")
    by_instruction = {ep["steps"][0]["language_instruction"]: ep for ep in eps["train"]}
    for where, out in data.read_episodes(bridge, "bridge_orig", "train"):  # tfds stores episodes in its own order
        s = by_instruction[out["instruction"][0].decode()]["steps"]
        state = np.stack([x["observation"]["state"] for x in s])
        g = [x["action"][6] for x in s]
        # independent gripper rule: each in-between value takes the next decided one, else the episode's last raw value
        decided = [next((float(v > 0.95) for v in g[t:] if v > 0.95 or v < 0.05), g[-1]) for t in range(len(g))]
        expect = np.concatenate([state[2:, :6] - state[1:-1, :6], np.array(decided[1:-1])[:, None]], axis=1)
        np.testing.assert_allclose(out["action"], expect, atol=1e-6)
        assert len(out["image"]) == len(s) - 2
        assert list(out["instruction"]) == [x["language_instruction"].encode() for x in s[1:-1]]
        red = [data.decode_and_resize(b, 16).numpy()[..., 0].mean() for b in out["image"]]
        np.testing.assert_allclose(red, [20 * (t + 1) for t in range(len(s) - 2)], atol=3)  # frame t = raw step t+1
    libero = data.open_dataset(root, "libero_spatial_no_noops")
    outs = _episodes(libero, "libero_spatial_no_noops", "all")
    assert data.split_names(libero) == ("train[:95%]", "train[95%:]")
    by_path = {ep["episode_metadata"]["file_path"]: ep for ep in eps["libero"]}
    for out in outs:
        ep = by_path["ep" + out["instruction"][0].decode().split()[-1]]
        a = np.stack([x["action"] for x in ep["steps"]])
        np.testing.assert_allclose(out["action"], np.c_[a[:, :6], 1 - np.clip(a[:, 6], 0, 1)], atol=1e-7)
        assert len(out["wrist_image"]) == len(a) and out["proprio"].shape == (len(a), 8)


def test_data_statistics_match_numpy_and_are_cached(rlds_root):
    root, eps = rlds_root
    builder = data.open_dataset(root, "bridge_orig")
    actions = np.concatenate([ep["action"] for ep in _episodes(builder, "bridge_orig", "all")])
    n_steps = sum(len(ep["steps"]) for ep in eps["train"] + eps["val"])
    stats = data.dataset_statistics(builder, "bridge_orig")
    assert stats["num_trajectories"] == 10 and stats["num_transitions"] == n_steps - 2 * 10 == len(actions)  # all
    assert stats["proprio"]["max"] == [0.0] * 7  # OpenVLA loads no proprio
    cache = next(Path(builder.data_dir).glob("dataset_statistics_*.json"))
    cache.write_text(json.dumps({**stats, "num_trajectories": -1}))  # a cached file is read, not recomputed
    assert data.dataset_statistics(builder, "bridge_orig")["num_trajectories"] == -1
    cache.write_text(json.dumps(stats))
    data.save_dataset_statistics(data.load_norm_stats(root, "bridge"), out := Path(builder.data_dir) / "run.json")
    saved = json.loads(out.read_text())["bridge_orig"]
    assert saved["action"]["mask"] == [True] * 6 + [False] and saved["num_transitions"] == stats["num_transitions"]


def test_data_normalization_round_trip_and_label_layout(rlds_root, fixture_tokenizer):
    from tokenizer import unnormalize_actions

    root, _ = rlds_root
    ds = data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, image_size=32, train=False, split="train",
                          shuffle_buffer_size=0)
    raw = np.concatenate([ep["action"] for ep in _episodes(ds.builders[0], "bridge_orig", "train")
                          if any(ep["instruction"])])
    norm = np.stack([f["action"] for f in ds.frames()])
    assert len(norm) == len(raw) and np.all(np.abs(norm) <= 1)  # the unlabeled episode is not trained on
    s = ds.norm_stats["bridge_orig"]["action"]
    inside = np.all((raw[:, :6] > s["q01"][:6]) & (raw[:, :6] < s["q99"][:6]), axis=1)
    back = unnormalize_actions(norm, ds.norm_stats, "bridge_orig")
    np.testing.assert_allclose(back[inside], raw[inside], atol=1e-5)  # exact inverse inside [q01, q99]
    np.testing.assert_array_equal(norm[:, 6], raw[:, 6])  # gripper passes through
    examples = list(itertools.islice(iter(ds), 5))
    batch = data.collate(examples)
    for e, ids, labels, mask in zip(examples, batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = len(e["input_ids"])
        assert (labels[: n - 8] == -100).all() and (labels[n - 8 : n] == ids[n - 8 : n]).all() and ids[n - 1] == 2
        assert (ids[n - 8 : n - 1] >= 31744).all() and ids[n - 9] == 29871 and ids[0] == 1
        assert (ids[n:] == 32000).all() and (labels[n:] == -100).all() and mask.sum() == n


def test_data_mixture_samples_by_the_original_weights(fixture_tokenizer, tmp_path):
    # a mixture of your own as a string: the same as a named one
    assert data.resolve_mixture("bridge_orig, libero_spatial_no_noops:0.5,bridge_orig:3") == \
        [("bridge_orig", 1.0), ("libero_spatial_no_noops", 0.5)]
    for bad, why in (("bridge_orig:x", "is not a number"), ("bridge_orig:0", "weight > 0"), (",bridge_orig", "name"),
                     ("bridge_orig,nope:1", "not supported yet: nope")):
        with pytest.raises(data.DataError, match=why):
            data.resolve_mixture(bad)
    names = ["fractal20220817_data", "taco_play", "viola", "droid"]  # weights 0.54, 2, 2, 0.06 in oxe_magic_soup_plus
    weights = dict(data.resolve_mixture("oxe_magic_soup_plus"))
    for name in names:
        _linked(tmp_path, next((OXE / "rlds" / name).iterdir()), name)
    ds = data.RLDSDataset(tmp_path, ",".join(f"{n}:{weights[n]}" for n in names), fixture_tokenizer, image_size=16,
                          shuffle_buffer_size=50, seed=3)
    n = 4000
    drawn = np.bincount([f[0][0] for f, _ in zip(ds._stream(np.random.default_rng(1)), range(n))], minlength=4) / n
    # the original's balance_weights: weight x num_transitions (every split on disk), normalized
    p = np.array([weights[k] * ds.norm_stats[k]["num_transitions"] for k in names])
    p /= p.sum()
    np.testing.assert_allclose(ds.weights, p)
    assert np.all(np.abs(drawn - p) < 4 * np.sqrt(p * (1 - p) / n) + 1 / n), (drawn, p)
    assert ds.dataset_length == int(max(ds.norm_stats[k]["num_transitions"] / p[i] for i, k in enumerate(names)))
    # every named mixture of the original resolves, or names exactly the datasets it lacks
    assert len(data.resolve_mixture("oxe_magic_soup_plus")) == 27 and len(data.resolve_mixture("oxe_magic_soup")) == 23
    with pytest.raises(data.DataError, match=r"'rtx_franka': not supported yet: maniskill_dataset_converted_externally_"
                       r"to_rlds, cmu_franka_exploration_dataset_converted_externally_to_rlds, berkeley_rpt_converted_"
                       r"externally_to_rlds, kaist_nonprehensile_converted_externally_to_rlds, stanford_robocook_"
                       r"converted_externally_to_rlds, cmu_play_fusion \("):
        data.resolve_mixture("rtx_franka")


def _ids(ds, n):
    return [(f["instruction"], tuple(np.round(f["action"], 5))) for f in itertools.islice(ds.frames(), n)]


def test_data_rank_split_disjoint_covering_and_seeded(rlds_root, fixture_tokenizer):
    root, _ = rlds_root
    kw = dict(image_size=16, train=False, split="train", shuffle_buffer_size=0)
    everything = _ids(data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, **kw), 10**6)
    parts = [_ids(data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, rank=r, world=3, **kw), 10**6)
             for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(everything) and len(set(sum(parts, []))) == len(everything)
    # training streams: each rank repeats only its own episodes; same seed -> same stream, other seed -> another
    stream = dict(image_size=16, shuffle_buffer_size=20, world=2)
    train = [data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, seed=5, rank=r, **stream) for r in range(2)]
    seen = [set(f[0][2] for f, _ in zip(ds._stream(np.random.default_rng(0)), range(150))) for ds in train]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == {i.encode() for i, _ in everything}
    again = data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, seed=5, rank=0, **stream)
    other = data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, seed=6, rank=0, **stream)
    assert _ids(again, 60) == _ids(train[0], 60) != _ids(other, 60)


def test_data_resume_continues_the_same_stream(rlds_root, fixture_tokenizer):
    root, _ = rlds_root
    kw = dict(image_size=32, image_aug=True, shuffle_buffer_size=25, seed=11)
    first = data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, **kw)
    it, head = iter(first), []
    for _ in range(13):
        head.append(next(it))
    state = first.state_dict()
    tail = list(itertools.islice(it, 20))
    resumed = data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint's JSON / torch.save
    again = list(itertools.islice(iter(resumed), 20))
    assert state["position"] == 13 and resumed.position == 33
    for a, b in zip(tail, again):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(ValueError, match="seed"):
        data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, **{**kw, "seed": 12}).load_state_dict(state)


def test_data_augmentation_only_in_training(rlds_root, fixture_tokenizer):
    root, _ = rlds_root
    builder = data.open_dataset(root, "bridge_orig")
    first = next(ep for ep in _episodes(builder, "bridge_orig", "val"))
    plain = [data.decode_and_resize(b, 32).numpy() for b in first["image"]]
    evaluation = data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, image_size=32, train=False, image_aug=True,
                                  shuffle_buffer_size=0)
    assert all(np.array_equal(f["image"], p) for f, p in zip(evaluation.frames(), plain))
    training = data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, image_size=32, image_aug=True, split="val",
                                shuffle_buffer_size=0)
    frames = list(itertools.islice(training.frames(), len(plain)))
    assert sorted(f["instruction"] for f in frames) == sorted(x.decode() for x in first["instruction"])
    assert not any(np.array_equal(f["image"], p) for f, p in zip(frames, plain))


def test_data_errors_name_dataset_file_and_expectation(rlds_root, fixture_tokenizer, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    root, eps = rlds_root
    (tmp_path / "missing_root").mkdir()
    with pytest.raises(data.DataError, match=r"no RLDS dataset at .*missing_root/bridge_orig/<version>/dataset_info"):
        data.open_dataset(tmp_path / "missing_root", "bridge_orig")
    with pytest.raises(data.DataError, match="not a directory"):
        data.open_dataset(tmp_path / "nope", "bridge_orig")
    with pytest.raises(data.DataError, match=r"unknown dataset or mixture 'bridge_v9'.*bridge_orig.*oxe_magic_soup"):
        data.RLDSDataset(root, "bridge_v9", fixture_tokenizer)
    with pytest.raises(data.DataError, match="not supported yet: droid_wipe"):
        data.RLDSDataset(tmp_path / "nope", "droid_wipe", fixture_tokenizer)  # before touching the disk
    # bridge_orig written without observation/state: the error names the feature and the record
    F = tfds.features
    feats = _bridge_features(F, 16, state=False)
    nostate = [{**ep, "steps": [{**s, "observation": {k: v for k, v in s["observation"].items() if k != "state"}}
                                for s in ep["steps"]]} for ep in eps["train"][:2]]
    data.write_rlds(tmp_path / "nostate", "bridge_orig", feats, {"train": nostate})
    with pytest.raises(data.DataError, match=r"bridge_orig \(.*bridge_orig-train.tfrecord-00000-of-00001__\d+\): "
                       r"no feature 'steps/observation/state'"):
        data.load_norm_stats(tmp_path / "nostate", "bridge_orig")
    # wrong action dimension from a user's standardization function
    monkeypatch.setitem(data.DATASETS, "six_dof", oxe.Layout(movement=("action[:5]",)))
    shutil.copytree(root / "libero_spatial_no_noops", tmp_path / "r6" / "six_dof")
    with pytest.raises(data.DataError, match=r"six_dof .*: standardized action has shape \(\d+, 6\), expected"):
        data.load_norm_stats(tmp_path / "r6", "six_dof")
    # empty: bridge episodes of 2 steps leave no frame after dropping the first and last
    data.write_rlds(tmp_path / "empty", "bridge_orig", _bridge_features(F, 16),
                    {"train": [_bridge_episode(np.random.default_rng(0), 0, 2, "x")]})
    with pytest.raises(data.DataError, match=r"bridge_orig: .*empty/bridge_orig/1.0.0 holds no steps"):
        data.load_norm_stats(tmp_path / "empty", "bridge_orig")
    # a corrupt record in the val file (bytes zeroed mid-file): the error names that file, not the train file
    shutil.copytree(root / "bridge_orig", tmp_path / "bad" / "bridge_orig")
    shard = next((tmp_path / "bad" / "bridge_orig").rglob("*-val.tfrecord-*"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    shard.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match=r"bridge_orig: corrupt record in \S*bridge_orig-val.tfrecord-0") as e:
        data.load_norm_stats(tmp_path / "bad", "bridge_orig")
    assert "-train.tfrecord" not in str(e.value)


def _pixel_expert(image, instruction, state=None):
    """Solve the demo from pixels alone: find the named block's centre in the wrist view, step towards it (the
    gripper is the image centre; a block cut by the image edge still shows on its side of the centre)."""
    S = image.shape[0]
    color = np.array(demo.DEMO_COLORS[instruction.split()[-2]])
    block = np.array(np.nonzero(np.all(np.abs(image.astype(int) - color) < 8, axis=-1))[::-1]).mean(axis=1) + 0.5
    d = (block - S / 2) / (S / 224 * demo.DEMO_CELL_PX) * demo.DEMO_STEP  # pixels from the centre -> table units
    move = np.where(np.abs(d) > demo.DEMO_STEP / 2, np.sign(d) * demo.DEMO_STEP, 0.0)
    return np.array([*move, 0, 0, 0, 0, float(move.any())])


def test_data_demo_world_rlds_and_closed_loop(tmp_path, fixture_tokenizer):
    path = demo.main(demo.DemoConfig(tmp_path, episodes=20, seed=1))
    assert path == tmp_path / "nanovla_demo" / "1.0.0" and (path / "features.json").is_file()
    ds = data.RLDSDataset(tmp_path, "nanovla_demo", fixture_tokenizer, train=False, split="train",
                          shuffle_buffer_size=0)
    frames = list(ds.frames())
    env = demo.DemoEnv(seed=1)
    episodes = [demo.demo_episode(env) for _ in range(20)]
    assert ds.norm_stats["nanovla_demo"]["num_trajectories"] == 20
    assert ds.norm_stats["nanovla_demo"]["num_transitions"] == sum(len(e["steps"]) for e in episodes)
    assert len(frames) == sum(len(e["steps"]) for e in episodes[2:])  # 10% validation
    assert all(f["image"].shape == (224, 224, 3) and f["instruction"].startswith("move to the ") for f in frames)
    tokens = np.stack([ds.action_tokenizer.encode(f["action"]) for f in frames])
    assert set(np.unique(tokens[:, :2])) <= {31999, 31872, 31745, 31744} and (tokens[:, 2:6] == 31872).all()
    wrist = data.RLDSDataset(tmp_path, "nanovla_demo", fixture_tokenizer, train=False, split="train",
                             shuffle_buffer_size=0, wrist=True)  # the second camera: the same view, turned a quarter
    assert all(np.array_equal(f["wrist_image"], np.rot90(f["image"])) for f in itertools.islice(wrist.frames(), 5))
    assert demo.demo_success_rate(_pixel_expert, episodes=20) == 1.0  # solvable from image + instruction alone
    assert demo.demo_success_rate(lambda image, instruction, state: np.zeros(7), episodes=20) == 0.0


# ---- train.py -----------------------------------------------------------------------------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # 1 thread per rank: same numerics anywhere


@pytest.fixture(scope="module")
def train_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_demo")
    demo.make_demo(root, episodes=20, seed=1)
    return root


def _train_args(run, root, **kw):
    kw = {"data-root": root, "run-dir": run, "export-dir": run / "export", "shuffle-buffer-size": 64,
          "eval-episodes": 0, "log-every": 1, "global-batch-size": 4, "max-steps": 8, "save-every": 3,
          "schedule": "constant", **kw}
    return [f"--config.{k}={v}" for k, v in kw.items()]


def _config(root, run, **kw):  # the tiny recipe, small: the in-process runs and the multi-rank checks
    kw = {"global_batch_size": 8, "learning_rate": 1e-3, "log_every": 1, "save_every": 0, "bf16": False,
          "export_dir": run / "export", **kw}
    return train.TrainConfig(data_root=root, run_dir=run, schedule="constant", eval_episodes=0,
                             shuffle_buffer_size=64, export_dtype="float32", **kw)


def _records(run):  # every line of metrics.jsonl; while a run writes it: nothing yet, or what is complete
    try:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _weights(path):
    return load_file(str(path / "export" / "model.safetensors"))


def _launch(check, nproc, *args):
    """`torchrun test_vla.py <check> <args>` on nproc CPU ranks. --standalone: the agent's store binds port 0 and the
    ranks reuse it, so no port is picked and released first for another process to take."""
    cmd = [*TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", __file__, check, *map(str, args)]
    run = subprocess.run(cmd, env=TRAIN_ENV, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def _main_each(out, **configs):  # in a check: train.main per config; rank 0 writes histories and each rank's share
    results = {}
    for name, config in configs.items():
        r, shares = train.main(config), [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shares, r["params_local"] / r["params_total"])
        results[name] = {"history": r["history"], "shares": shares}
    if torch.distributed.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))


def check_sharding(root, out, fixture):  # 2 ranks
    root, out = Path(root), Path(out)
    _main_each(out, one_batch=_config(root, out / "one", max_steps=2, per_device_batch_size=4),
               accumulated=_config(root, out / "acc", max_steps=2, per_device_batch_size=2),
               plain=_config(root, out / "plain", max_steps=2, bf16=True, activation_checkpointing=False),
               checkpointed=_config(root, out / "ckpt", max_steps=2, bf16=True, activation_checkpointing=True),
               # each rank reads only its rows of the init checkpoint; lr 0: the export must be the checkpoint itself
               init=_config(root, out / "init", max_steps=1, init_from=Path(fixture), learning_rate=0.0))


def check_hsdp(root, out):  # 4 ranks: FSDP over all 4, HSDP (2 replicas x 2 shards), HSDP stopped and resumed
    root, out = Path(root), Path(out)
    _main_each(out, fsdp=_config(root, out / "fsdp", max_steps=3),
               hsdp=_config(root, out / "hsdp", max_steps=3, shard_group_size=2),
               first=_config(root, out / "resumed", max_steps=2, save_every=2, shard_group_size=2),
               resumed=_config(root, out / "resumed", max_steps=3, shard_group_size=2, resume=True))


def test_train_config_arithmetic_and_its_errors():
    config, accumulation = train.resolve(train.TrainConfig(global_batch_size=256, per_device_batch_size=16), 8)
    assert accumulation == 2 and config.learning_rate == 2e-3  # 256 = 8 ranks x 16 x 2; the tiny recipe filled in
    config, accumulation = train.resolve(train.TrainConfig(model="openvla-7b"), 64)
    assert (config.global_batch_size, config.per_device_batch_size, accumulation, config.learning_rate) == (
        2048, 32, 1, 2e-5)
    assert train.resolve(train.TrainConfig(per_device_batch_size=16), 4)[0].global_batch_size == 64  # 4 x 16
    with pytest.raises(ValueError, match="global-batch-size 100 is not divisible by the world size 8"):
        train.resolve(train.TrainConfig(global_batch_size=100), 8)
    with pytest.raises(ValueError, match=r"per-device-batch-size 3 x world size 2 = 6"):
        train.resolve(train.TrainConfig(global_batch_size=16, per_device_batch_size=3), 2)
    with pytest.raises(ValueError, match="shard-group-size 3 does not divide the world size 8"):
        train.resolve(train.TrainConfig(shard_group_size=3), 8)
    with pytest.raises(ValueError, match="--config.resume"):
        train.resolve(train.TrainConfig(export_only=True), 1)


def test_train_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(train_demo, tmp_path):
    # lr 1e30: step 1's loss is finite and its checkpoint is written; its update blows the weights up to ~1e30, so
    # step 2's forward overflows. The run must stop there, name step 2, and never save or export the bad state.
    run, good = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-000001"
    config = _config(train_demo, run, max_steps=6, save_every=1, keep_last=5, learning_rate=1e30, max_grad_norm=1e30)
    with pytest.raises(SystemExit, match=f"non-finite loss or gradient norm at step 2; stopping. The last good "
                                         f"checkpoint is {good}$"):
        train.main(config)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]  # no step 2, no .tmp left
    assert [m["step"] for m in _records(run)] == [1] and np.isfinite(_records(run)[0]["loss"])
    assert not (run / "export").exists()
    saved = dcp.FileSystemReader(good).read_metadata().state_dict_metadata  # complete: DCP writes .metadata last
    assert "step" in saved and any(k.startswith("model.language_model.") for k in saved)


def test_train_data_or_checkpoint_error_is_one_message_and_a_mistyped_root_writes_nothing(tmp_path):
    typo = tmp_path / "demo_dta"
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config.data-root={typo}"], env=TRAIN_ENV,
                         timeout=300, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (f"error: {typo}: no nanovla_demo dataset; the demo is written on "
                                                   "first use only to runs/demo_data, elsewhere with python demo.py "
                                                   "--data-dir DIR")
    assert not typo.exists()
    gone = tmp_path / "no_checkpoint"  # finetune.py's start: read through checkpoint.py, a missing directory
    out = subprocess.run([sys.executable, str(ROOT / "finetune.py"), f"--config.init-from={gone}"], env=TRAIN_ENV,
                         timeout=300, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == f"error: {gone}: checkpoint directory does not exist"


def test_train_resume_edges_corrupt_checkpoint_metrics_and_export(train_demo, tmp_path):
    run, config = tmp_path / "run", lambda **kw: _config(train_demo, tmp_path / "run", save_every=2, **kw)
    first = train.main(config(max_steps=4, global_batch_size=4))
    bad = run / "checkpoints" / "step-000004"
    shard = next(bad.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # the newest checkpoint damaged on disk
    with pytest.raises(SystemExit, match=rf"checkpoint {bad} cannot be read \(RuntimeError: .*\); to continue from "
                                         rf"the one before it, step-000002, move it aside: mv {bad} (\S+)$") as e:
        train.main(config(max_steps=6, global_batch_size=4, resume=True))
    bad.rename(re.search(r"mv \S+ (\S+)$", str(e.value)).group(1))  # as the message says
    (run / ".export.tmp-stale").mkdir()  # as a SIGKILL during save_pretrained leaves it
    resumed = train.main(config(max_steps=6, global_batch_size=4, resume=True))
    assert [m["loss"] for m in resumed["history"][:2]] == [m["loss"] for m in first["history"][2:]]  # exact
    assert [m["step"] for m in _records(run)] == [1, 2, 3, 4, 5, 6]  # the replayed steps 3, 4 logged once
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".unreadable-step-000004", "step-000004",
                                                                       "step-000006"]
    umask = os.umask(0)
    os.umask(umask)
    assert not list(run.glob(".export.tmp-*")) and (run / "export").stat().st_mode & 0o777 == 0o777 & ~umask


def test_train_hsdp_matches_fsdp_and_resumes(train_demo, tmp_path):
    assert "HSDP: 2 replicas x 2 shards" in _launch("check_hsdp", 4, train_demo, tmp_path).stdout
    r = json.loads((tmp_path / "results.json").read_text())
    assert all(abs(share - 0.25) < 0.01 for share in r["fsdp"]["shares"])  # a quarter per rank
    assert all(abs(share - 0.5) < 0.01 for share in r["hsdp"]["shares"])  # half per rank: 2 copies of the weights
    # the same global batches: the same update, up to the order of the fp32 gradient sums
    for a, b in zip(r["fsdp"]["history"], r["hsdp"]["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    fsdp, hsdp = _weights(tmp_path / "fsdp"), _weights(tmp_path / "hsdp")
    assert max(float((fsdp[k] - hsdp[k]).abs().max()) for k in fsdp) < 1e-6
    # stopped at step 2 (checkpoint) and resumed under HSDP: step 3 and the final weights exactly as uninterrupted
    exact = ("step", "loss", "grad_norm", "action_accuracy", "l1_loss")
    assert [[h[k] for k in exact] for h in r["resumed"]["history"]] == [[r["hsdp"]["history"][2][k] for k in exact]]
    resumed = _weights(tmp_path / "resumed")
    assert all(torch.equal(hsdp[k], resumed[k]) for k in hsdp)


def test_train_sharding_accumulation_and_activation_checkpointing(train_demo, tmp_path):
    _launch("check_sharding", 2, train_demo, tmp_path, FIXTURE)
    r = json.loads((tmp_path / "results.json").read_text())
    # each rank holds its half of every parameter (dim-0 shards; odd row counts make it not exactly half)
    assert all(abs(share - 0.5) < 0.01 for share in r["one_batch"]["shares"])
    # 2 micro-batches of 2 per rank == 1 batch of 4 (fp32): same losses, gradient norms and updated weights
    for a, b in zip(r["one_batch"]["history"], r["accumulated"]["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    one, acc = _weights(tmp_path / "one"), _weights(tmp_path / "acc")
    assert max(float((one[k] - acc[k]).abs().max()) for k in one) < 1e-5  # lr 1e-3: the 2 updates are ~2e-3
    # activation checkpointing recomputes the same bf16 forward: identical losses, gradient norms and weights
    for a, b in zip(r["plain"]["history"], r["checkpointed"]["history"], strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
    plain, ckpt = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    assert all(torch.equal(plain[k], ckpt[k]) for k in plain)
    # rank-local reads of an init checkpoint (rows [start, stop) of each tensor per rank) reassemble it exactly
    headers, init = read_weight_headers(FIXTURE), _weights(tmp_path / "init")
    assert set(init) == set(headers) and all(torch.equal(init[k], read_tensor(headers, k).float()) for k in init)
    assert all(abs(share - 0.5) < 0.01 for share in r["init"]["shares"])


def _rendezvous_port():
    """A free port below the kernel's ephemeral range: a bind to port 0 elsewhere (the concurrent run's store and
    gloo, other tests) never gets it between this check and torchrun's bind, as it can get one from that range."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in np.random.default_rng().permutation(np.arange(low // 2, low)):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", int(port))) != 0:
                return int(port)


def test_train_two_nodes_kill_resume_and_export(train_demo, tmp_path):
    script = str(ROOT / "train.py")
    # the reference run: two single-process "nodes" rendezvousing over loopback (c10d), training together
    port, nodes = _rendezvous_port(), []
    for _ in range(2):
        nodes.append(subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                       f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id", "nodes", script,
                                       *_train_args(tmp_path / "nodes", train_demo)],
                                      env=TRAIN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    # the same run on one node, SIGKILLed after step 4 (checkpoint at step 3), then resumed
    killed = tmp_path / "killed"
    args = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", script, *_train_args(killed, train_demo)]
    proc = subprocess.Popen(args, env=TRAIN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while len(_records(killed)) < 4:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in (killed / "checkpoints").glob("step-*")] == ["step-000003"]
    assert not (killed / "export").exists()
    resumed = subprocess.run(args + ["--config.resume"], env=TRAIN_ENV, timeout=300, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    for node in nodes:
        assert node.wait(timeout=300) == 0, node.stderr.read().decode()[-3000:]

    reference = {m["step"]: m["loss"] for m in _records(tmp_path / "nodes")}
    assert sorted(reference) == list(range(1, 9)) and reference[8] < reference[1] - 0.5  # the loss falls
    # resumed after SIGKILL == uninterrupted, exactly, and each step logged once (steps 4.. re-ran)
    assert [(m["step"], m["loss"]) for m in _records(killed)] == sorted(reference.items())
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-000006", "step-000008"]  # keep 2

    vla = VLA.from_pretrained(killed / "export")  # the released layout, with the training data's statistics
    assert "nanovla_demo" in json.loads((killed / "export" / "config.json").read_text())["norm_stats"]
    image, instruction = demo.DemoEnv(seed=3).reset()
    action = vla.predict_action(image, instruction, unnorm_key="nanovla_demo")
    assert action.shape == (7,) and np.isfinite(action).all()


# ---- finetune.py --------------------------------------------------------------------------------------------------


def test_lora_zero_init_is_a_no_op_and_merge_matches(fixture_vla):
    vla, g = copy.deepcopy(fixture_vla), torch.Generator().manual_seed(0)
    pixel_values, ids = torch.randn(2, 6, 224, 224, generator=g), torch.randint(0, 32000, (2, 12), generator=g)
    with torch.no_grad():
        before = vla(pixel_values, ids).logits
        names = finetune.add_lora(vla, rank=4, alpha=8, dropout=0.0)
        assert "language_model.lm_head" in names and "vision_backbone.featurizer.patch_embed.proj" not in names
        assert torch.equal(vla(pixel_values, ids).logits, before)  # B = 0: exactly the checkpoint's outputs
        layers = [m for m in vla.modules() if isinstance(m, finetune.LoRALinear)]
        for m in layers:
            m.lora_A.normal_(0, 0.1, generator=g)
            m.lora_B.normal_(0, 0.1, generator=g)
        adapted = vla(pixel_values, ids).logits
        assert (adapted - before).abs().max() > 1e-2
        for m in layers:
            m.merge()
        merged = vla(pixel_values, ids).logits
        assert (merged - adapted).abs().max() <= 1e-4 * max(1.0, adapted.abs().max())  # fp32: (W + sBA) x vs Wx + sBAx
        # on a bf16 weight: the fp32 sum rounded once, elementwise; rounding the delta first (twice) differs
        m = finetune.LoRALinear(torch.nn.Linear(256, 256).to(torch.bfloat16), rank=8, alpha=16, dropout=0.0)
        A, B, x = (torch.randn(*shape, generator=g) for shape in [(8, 256), (256, 8), (4, 256)])
        m.lora_A.copy_(A / 10)
        m.lora_B.copy_(B / 10)
        W, delta, y = m.weight.float(), 2.0 * (m.lora_B @ m.lora_A), m(x.to(torch.bfloat16)).float()
        m.merge()
        assert torch.equal(m.weight, (W + delta).to(torch.bfloat16))
        assert not torch.equal(m.weight, W.to(torch.bfloat16) + delta.to(torch.bfloat16))
        assert (m(x.to(torch.bfloat16)).float() - y).abs().max() <= 0.05 * y.abs().max()  # bf16 forward either way


def test_finetune_trains_adapters_only_resumes_and_merges(train_demo, tmp_path):
    def run(name, **kw):
        kw = {"per_device_batch_size": 4, "learning_rate": 2e-3, "max_steps": 4, "save_every": 2, "log_every": 1,
              "image_aug": False, "shuffle_buffer_size": 64, "data_root": train_demo, "init_from": FIXTURE, **kw}
        return finetune.main(replace(finetune.FINETUNE, run_dir=tmp_path / name, **kw))
    r = run("full")
    losses = [m["loss"] for m in r["history"]]
    assert losses[-1] < losses[0] and 0 < r["params_trained"] < 0.25 * r["params_total"]  # the loss falls
    recipe = json.loads((tmp_path / "full" / "train_config.json").read_text())  # a checkpoint not the demo's
    assert (recipe["activation_checkpointing"], recipe["save_every"], recipe["max_grad_norm"]) == (True, 2, math.inf)
    # the checkpoint holds what trains only: the adapters (and their optimizer state)
    saved = dcp.FileSystemReader(tmp_path / "full" / "checkpoints" / "step-000004").read_metadata().state_dict_metadata
    assert {k.split(".")[-1] for k in saved if k.startswith("model.")} == {"lora_A", "lora_B"}
    # the export is the one merge of each adapter into its frozen bf16 weight, every other tensor the checkpoint's
    headers, merged = read_weight_headers(FIXTURE), load_file(str(tmp_path / "full" / "merged" / "model.safetensors"))
    adapters = {n: m for n, m in r["model"].named_modules() if isinstance(m, finetune.LoRALinear)}
    for key in headers:
        m, base = adapters.get(key.removesuffix(".weight")), read_tensor(headers, key).to(torch.bfloat16)
        want = base if m is None else finetune.merge_weight(base, m.lora_A.full_tensor(), m.lora_B.full_tensor(),
                                                             m.scale)
        assert torch.equal(merged[key], want), key
    run("resumed", max_steps=2)
    assert [m["loss"] for m in run("resumed", resume=True)["history"]] == losses[2:]  # resume continues exactly
    vla = VLA.from_pretrained(tmp_path / "full" / "merged")
    assert {"nanovla_demo", *json.loads((FIXTURE / "config.json").read_text())["norm_stats"]} <= set(vla.norm_stats)
    image, instruction = demo.DemoEnv(seed=3).reset()
    action = vla.predict_action(image, instruction, unnorm_key="nanovla_demo")
    assert action.shape == (7,) and np.isfinite(action).all()
    bad = tmp_path / "bad"  # a checkpoint whose actions are 6-dim cannot learn the demo's 7-dim ones
    shutil.copytree(FIXTURE, bad)
    config = json.loads((bad / "config.json").read_text())
    for stats in config["norm_stats"].values():
        stats["action"] = {k: v[:6] if isinstance(v, list) else v for k, v in stats["action"].items()}
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "dataset_statistics.json").write_text(json.dumps(config["norm_stats"]))
    with pytest.raises(ValueError, match=r"nanovla_demo has 7-dim actions but .*bad was trained on \[6\]-dim"):
        run("bad_run", init_from=bad)


def test_finetune_demo_path_mirrored_camera_before_after_and_serve_line(train_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # python finetune.py's relative paths: checkpoints/demo, runs/...
    with pytest.raises(SystemExit, match="no demo policy in checkpoints/demo: train it first with python train.py"):
        finetune.main()
    train.main(_config(train_demo, tmp_path / "base", max_steps=1, export_dir=finetune.DEMO))  # a demo policy
    image, _ = demo.DemoEnv(seed=5, mirrored=True).reset()
    assert np.array_equal(image, demo.DemoEnv(seed=5).reset()[0][:, ::-1])  # the same scene, seen mirrored
    demo.make_demo(finetune.FINETUNE.data_root, episodes=20, seed=1, mirrored=True)  # small: the demo writes 2000
    r = finetune.main(replace(finetune.FINETUNE, max_steps=2, eval_episodes=2))
    assert r["step"] == 2 and all(0 <= r["success"][k] <= 1 for k in ("before", "after", "original"))
    recipe = json.loads((tmp_path / "runs" / "finetune" / "train_config.json").read_text())
    assert (recipe["learning_rate"], recipe["image_aug"], recipe["max_grad_norm"]) == (3e-3, False, math.inf)
    assert capsys.readouterr().out.strip().endswith("python serve.py --config.checkpoint runs/finetune/merged")


# ---- oft.py (against ../shared/fixtures/openvla-oft-tiny) -------------------------------------------------------
OFT_FIXTURE = SHARED / "fixtures" / "openvla-oft-tiny"
OFT_EXPECTED = json.loads((OFT_FIXTURE / "expected.json").read_text())
_png = lambda name: np.asarray(Image.open(OFT_FIXTURE / name))  # noqa: E731
_sha = lambda array: hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()  # noqa: E731


@pytest.fixture(scope="session")
def oft_vla():
    return VLA.from_pretrained(OFT_FIXTURE, dtype=torch.float32)


def test_oft_fixture_images_ids_positions_intermediates_chunks(oft_vla):
    vla, cases = oft_vla, OFT_EXPECTED["cases"]
    raw = [[_png(c["images"][r]["raw"]["file"]) for r in ("full", "wrist")] for c in cases]
    for case, images in zip(cases, raw):
        for role, image in zip(("full", "wrist"), images):  # deploy-side preparation, bit-exact with TF's ops
            steps = case["images"][role]
            if steps["resize_image_for_policy_applied"]:
                assert _sha(oft.prepare_image(image, center_crop=False)) == steps["resized_224"]["sha256"]
            assert _sha(oft.prepare_image(image)) == steps["center_cropped_224"]["sha256"], (case["name"], role)
        ids = vla.prompt_ids(case["instruction"]) + [oft.PLACEHOLDER_ID] * 56 + [oft.STOP_ID]
        assert ids == case["model_input_ids"]
        pixel_values = vla.preprocess([_png(case["images"][r]["center_cropped_224"]["file"]) for r in case["images"]])
        pixel_values = pixel_values.reshape(1, 12, 224, 224)  # [full DINOv2, full SigLIP, wrist DINOv2, wrist SigLIP]
        assert _sha(pixel_values.numpy().astype("<f4")) == case["pixel_values"]["sha256"]
        proprio = oft.normalize_proprio(case["proprio"]["raw"], vla.norm_stats[case["unnorm_key"]]["proprio"])
        np.testing.assert_allclose(proprio, case["proprio"]["normalized"], rtol=0, atol=1e-12)
        seq, n = case["sequence"], len(ids)
        action_mask = ((torch.arange(n) >= n - 57) & (torch.arange(n) < n - 1))[None]  # placeholders, not STOP
        assert seq["placeholder_positions"] == [513 + n - 57, 513 + n - 1] and seq["action_hidden_slice"] == [
            513 + n - 58, 513 + n - 2]  # each action value is read one position before its placeholder
        inputs = (pixel_values, torch.tensor([ids]), torch.ones(1, n), action_mask, torch.tensor(proprio).float()[None])
        with torch.no_grad():
            normalized, hidden = oft.forward(vla, *inputs)
            got = {"projector_features": vla.projector(vla.vision_backbone(pixel_values.reshape(2, 6, 224, 224))),
                   "actions_hidden_states": hidden}
            if "intermediates" in case:  # case 0: each featurizer per camera, the LLM's input and last hidden states
                x = got["inputs_embeds"] = oft.embed(vla, *inputs[:2], *inputs[3:])
                assert x.shape[1] == seq["multimodal_length"]
                got["last_hidden_states"] = vla.language_model.model(x, torch.arange(x.shape[1])[None],
                                                                     torch.ones(1, 1, 1, x.shape[1], dtype=torch.bool))
                for i, view in enumerate(pixel_values.split(3, dim=1)):
                    vit = vla.vision_backbone.fused_featurizer if i % 2 else vla.vision_backbone.featurizer
                    got[f"{('full', 'wrist')[i // 2]}_{('dino', 'siglip')[i % 2]}_features"] = vit(view)
        for name, tensor in got.items():
            ref = np.load(OFT_FIXTURE / (case[name]["file"] if name in case else case["intermediates"][name]))
            assert np.abs(tensor.numpy().reshape(ref.shape) - ref).max() <= logit_tol(ref), name
        np.testing.assert_allclose(normalized[0].numpy(), case["normalized_actions"], rtol=0, atol=1e-4)
        chunk = vla.predict_action(images, case["instruction"], case["unnorm_key"], proprio=case["proprio"]["raw"])
        assert chunk.shape == (8, 7) and chunk.dtype == np.float64
        np.testing.assert_allclose(chunk, case["actions"], rtol=0, atol=1e-4)
    chunks = vla.predict_actions(raw, [c["instruction"] for c in cases], [c["unnorm_key"] for c in cases],
                                 proprio=[c["proprio"]["raw"] for c in cases])  # 4 prompt lengths, right-padded
    np.testing.assert_allclose(chunks, [c["actions"] for c in cases], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="trained with proprio"):
        vla.predict_action(raw[0], cases[0]["instruction"], unnorm_key=cases[0]["unnorm_key"])


def test_oft_fixture_training_l1_loss(oft_vla):
    t = OFT_EXPECTED["training"]
    for ex in t["examples"]:  # the data side: tokenizer.py's example of the flattened chunk; BOUNDS_Q99 (TF: float32)
        example = training_example(oft_vla.tokenizer, oft_vla.action_tokenizer, ex["instruction"],
                                   np.ravel(ex["normalized_actions"]))
        assert example == (ex["input_ids"], ex["labels"])
        for raw, name, want in (("raw_actions", "action", "normalized_actions"),
                                ("raw_proprio", "proprio", "normalized_proprio")):
            got = normalize_actions(ex[raw], oft_vla.norm_stats[ex["dataset"]][name])
            np.testing.assert_allclose(got, ex[want], rtol=0, atol=1e-6)
    pixel_values = torch.stack([oft_vla.preprocess([_png(f"case{ex['case']}_{r}_center_cropped.png")
                                                    for r in ("full", "wrist")]).flatten(0, 1) for ex in t["examples"]])
    batch = {k: torch.tensor(t["batch"][k]) for k in ("input_ids", "labels", "attention_mask", "proprio", "actions")}
    batch["pixel_values"] = pixel_values
    keys = ("pixel_values", "input_ids", "attention_mask", "labels", "proprio", "actions")
    with torch.no_grad():  # VLA.forward with labels: OFT's run_forward_pass for a model with an action head
        predicted, loss = oft_vla(*(batch[k] for k in keys))
        alone = [oft_vla(*(batch[k][i:i + 1] for k in keys)).loss for i in range(2)]
    assert abs(loss.item() / t["loss"] - 1) <= 1e-4
    np.testing.assert_allclose(predicted.numpy(), np.load(OFT_FIXTURE / t["predicted_actions_file"]), rtol=0, atol=1e-4)
    l1 = (predicted - batch["actions"]).abs()
    for got, want in ((l1[:, 0].mean(), t["metrics"]["curr_action_l1_loss"]), *zip(alone, t["loss_each_example_alone"]),
                      *zip(l1.mean((1, 2)), t["per_example_l1_in_batch"])):  # row 0 = the current action
        assert abs(float(got) / want - 1) <= 1e-4


def test_oft_data_chunks_wrist_and_proprio(rlds_root, fixture_tokenizer):
    """OFT's pipeline: the next `chunk` actions (frames whose chunk runs past the end dropped, as its chunk_act_obs),
    the wrist camera after the third-person one, proprio normalized with the real state's statistics."""
    root, eps = rlds_root
    ds = data.RLDSDataset(root, "libero_spatial_no_noops", fixture_tokenizer, image_size=16, train=False,
                          split="train", shuffle_buffer_size=0, chunk=3, wrist=True, proprio=True)
    episodes = _episodes(ds.builders[0], "libero_spatial_no_noops", "train")
    states = np.concatenate([ep["proprio"] for ep in episodes]).astype(np.float64)
    stats = ds.norm_stats["libero_spatial_no_noops"]
    np.testing.assert_allclose(stats["proprio"]["q99"], np.quantile(states, 0.99, axis=0), rtol=1e-6)
    want = [(normalize_actions(ep["action"], stats["action"])[t:t + 3], ep["proprio"][t])
            for ep in episodes for t in range(len(ep["action"]) - 2)]
    examples = list(iter(ds))
    assert len(examples) == len(want) < sum(len(ep["action"]) for ep in episodes)
    for e, (chunk, state) in zip(examples, want):
        np.testing.assert_array_equal(e["actions"].numpy(), chunk.astype(np.float32))
        np.testing.assert_allclose(e["proprio"].numpy(), normalize_actions(state, stats["proprio"]), atol=1e-6)
        assert e["pixel_values"].shape == (12, 16, 16) and torch.equal(e["pixel_values"][6:], to_pixel_values(
            np.zeros((16, 16, 3), np.uint8), data.OPENVLA_IMAGE_NORM))  # the wrist camera: black in this dataset
        assert e["labels"][-22:-1].tolist() == ActionTokenizer(32000).encode(chunk).ravel().tolist()  # 3 x 7 tokens
    batch = data.collate(examples[:4])
    assert batch["actions"].shape == (4, 3, 7) and batch["proprio"].shape == (4, 8)
    with pytest.raises(data.DataError, match="no episode has the 9 steps one action chunk needs"):
        next(iter(data.RLDSDataset(root, "libero_spatial_no_noops", fixture_tokenizer, image_size=16, chunk=9,
                                   shuffle_buffer_size=0)))
    with pytest.raises(data.DataError, match="bridge_orig: its oxe.Layout has no wrist; train without, or add it"):
        data.RLDSDataset(root, "bridge_orig", fixture_tokenizer, wrist=True)


def test_oft_train_and_lora_finetune_l1_resume_export(train_demo, tmp_path):
    """--config.action-head l1: a new head + proprio projector on the VLA, the L1 loss on chunks, exact resume, and
    an export that loads as an OFT model; finetune.py: LoRA adapters + the new heads (OFT's main path)."""
    l1 = dict(action_head="l1", chunk=2, max_steps=4, save_every=2)
    r = train.main(_config(train_demo, tmp_path / "oft", **l1))
    losses = [m["loss"] for m in r["history"]]
    assert losses[-1] < losses[0] and all(abs(m["l1_loss"] - m["loss"]) < 1e-6 for m in r["history"])
    train.main(_config(train_demo, tmp_path / "resumed", **{**l1, "max_steps": 2}))
    resumed = train.main(_config(train_demo, tmp_path / "resumed", **l1, resume=True))
    assert [m["loss"] for m in resumed["history"]] == losses[2:]
    export = tmp_path / "oft" / "export"
    assert json.loads((export / "config.json").read_text())["num_actions_chunk"] == 2
    assert sorted(f.name for f in export.glob("*.pt")) == [f"{h}--4_checkpoint.pt" for h in oft.HEADS]
    vla = VLA.from_pretrained(export)
    assert (vla.action_head.chunk, vla.proprio_projector.fc1.in_features) == (2, 2)  # the demo's state: (x, y)
    env = demo.DemoEnv(seed=3)
    image, instruction = env.reset()
    cameras = [image, demo.second_view(image)]  # the demo's OFT twin reads its second camera by default
    assert json.loads((tmp_path / "oft" / "train_config.json").read_text())["wrist"] is True
    chunk = vla.predict_action(cameras, instruction, unnorm_key="nanovla_demo", proprio=env.state())
    assert chunk.shape == (2, 7) and np.isfinite(chunk).all()
    f = finetune.main(replace(finetune.FINETUNE, init_from=FIXTURE, data_root=train_demo, run_dir=tmp_path / "ft",
                              per_device_batch_size=4, image_aug=False, shuffle_buffer_size=64,
                              **{**l1, "max_steps": 2}))
    trained = {n.split(".")[0] if n.startswith(oft.HEADS) else n.split(".")[-1]
               for n, p in f["model"].named_parameters() if p.requires_grad}
    assert trained == {"lora_A", "lora_B", *oft.HEADS}
    merged = VLA.from_pretrained(tmp_path / "ft" / "merged")
    assert merged.action_head.chunk == 2 and merged.predict_action(cameras, instruction, "nanovla_demo",
                                                                  proprio=env.state()).shape == (2, 7)


def test_oft_save_load_layout_and_bad_heads(oft_vla, tmp_path):
    oft_vla.save_pretrained(tmp_path / "out")
    for name, keys in OFT_EXPECTED["component_checkpoints"].items():
        saved, ref = (torch.load(d / name, weights_only=True) for d in (tmp_path / "out", OFT_FIXTURE))
        assert list(saved) == list(keys) and all(torch.equal(saved[k], ref[k].float()) for k in keys)
    case = OFT_EXPECTED["cases"][1]
    images = [_png(case["images"][r]["raw"]["file"]) for r in ("full", "wrist")]
    chunk = VLA.from_pretrained(tmp_path / "out").predict_action(images, case["instruction"], case["unnorm_key"],
                                                                 case["proprio"]["raw"])
    np.testing.assert_allclose(chunk, case["actions"], rtol=0, atol=1e-4)
    bad = tmp_path / "out" / "action_head--150000_checkpoint.pt"
    for content, match in ((b"not a zip", "not a weights-only torch checkpoint"),  # corrupt
                           ({"module.model.fc2.weight": torch.zeros(7, 32)}, "does not fit this model"),  # mismatched
                           (torch.nn.Linear(2, 2), "not a weights-only")):  # a pickled object: never unpickled
        bad.write_bytes(content) if isinstance(content, bytes) else torch.save(content, bad)
        with pytest.raises(CheckpointError, match=match):
            VLA.from_pretrained(tmp_path / "out")
    bad.unlink()
    with pytest.raises(CheckpointError, match="no action_head"):  # a projector without its head
        VLA.from_pretrained(tmp_path / "out")


def test_oft_serve_is_a_drop_in_for_deploy_py(oft_vla):
    import json_numpy, serve  # noqa: E401

    config = serve.ServeConfig(port=0, unnorm_key="libero_object_no_noops", token=SERVE_TOKEN)
    server = serve.PolicyServer(config).attach(lambda: oft_vla)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for k, encoded in ((1, False), (3, True)):  # deploy.py's two forms; its clients send no unnorm_key
            case = OFT_EXPECTED["cases"][k]
            obs = {f"{r}_image": _png(case["images"][r]["raw"]["file"]) for r in ("full", "wrist")}
            obs.update(instruction=case["instruction"], state=np.array(case["proprio"]["raw"]))
            body = json.dumps({"encoded": json_numpy.dumps(obs)}) if encoded else json_numpy.dumps(obs)
            status, _, data = _http(server.server_address[1], "POST", "/act", body.encode())
            assert status == 200, data
            rows = json_numpy.loads(json.loads(data) if encoded else data)  # a list of 8 (7,) arrays, as deploy.py
            np.testing.assert_allclose(np.stack(rows), case["actions"], rtol=0, atol=1e-4)
        status, _, data = _http(server.server_address[1], "POST", "/act", json_numpy.dumps({**obs, "state": None}))
        assert status == 400 and b"'state' missing" in data
        server.config.center_crop = False  # --config.no-center-crop: a model trained without random crops
        status, _, data = _http(server.server_address[1], "POST", "/act", json_numpy.dumps(obs).encode())
        uncropped = oft_vla.predict_actions([[obs["full_image"], obs["wrist_image"]]], [obs["instruction"]],
                                            config.unnorm_key, [obs["state"]], center_crop=False)[0]
        np.testing.assert_allclose(np.stack(json_numpy.loads(data)), uncropped, rtol=0, atol=1e-6)
        assert np.abs(uncropped - case["actions"]).max() > 1e-3  # the crop matters
    finally:
        server.stop()


# ---- serve.py -----------------------------------------------------------------------------------------------------

SERVE_TOKEN = "test-token"


@pytest.fixture(scope="module")
def served():
    """serve.py on the tiny fixture in a subprocess, on a free port, with a bearer token read from $NANOVLA_TOKEN."""
    cmd = [sys.executable, "serve.py", "--config.checkpoint", str(FIXTURE), "--config.port", "0",
           "--config.max-wait-ms", "20", "--config.max-body-bytes", str(2**21),
           "--config.max-image-pixels", str(480 * 640)]  # the largest fixture image; bigger ones get 400
    env = {**os.environ, "NANOVLA_TOKEN": SERVE_TOKEN}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.monotonic() + 120
    threading.Thread(target=lines.extend, args=(proc.stdout,), daemon=True).start()  # drains the log as it comes
    port = r" on http://127\.0\.0\.1:(\d+)"
    while not (match := re.search(port, "".join(lines))) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not match:
        proc.kill()
        pytest.fail("serve.py did not start:\n" + "".join(lines))
    yield SimpleNamespace(proc=proc, port=int(match[1]), lines=lines)
    proc.kill()  # a no-op once the SIGTERM test has stopped it
    proc.wait(10)


def _http(port, method, path, body=None, token=SERVE_TOKEN, headers=None):
    """One request -> (status, headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body, {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})})
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read()


def _raw(port, data: bytes, timeout=10) -> bytes:
    """Raw bytes in; everything the server sent until it closed the connection (or the timeout) out."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s, contextlib.suppress(TimeoutError):
        s.sendall(data)
        while chunk := s.recv(1 << 16):
            out += chunk
    return out


def _case(expected, k):
    c = expected["cases"][k]
    return np.load(FIXTURE / f"case{k}_image_uint8.npy"), c["instruction"], c["unnorm_key"], np.array(c["actions"])


def _act_json_numpy(port, image, instruction, unnorm_key, **kw):
    body = json_numpy.dumps({"image": image, "instruction": instruction, "unnorm_key": unnorm_key})
    status, _, data = _http(port, "POST", "/act", body.encode(), **kw)
    assert status == 200, data
    return json_numpy.loads(data)


def _png_b64(image, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_serve_json_numpy_client_gets_fixture_actions(served, expected):
    for k in range(4):  # case 4 keeps its instruction un-lower-cased, which no deploy.py prompt does
        image, instruction, key, want = _case(expected, k)
        action = _act_json_numpy(served.port, image, instruction, key)
        assert isinstance(action, np.ndarray) and action.dtype == np.float64 and action.shape == (7,)
        np.testing.assert_allclose(action, want, rtol=0, atol=1e-6)
    # deploy.py's double-encoded form: the request and the answer are json_numpy text inside a JSON string
    image, instruction, key, want = _case(expected, 0)
    inner = json_numpy.dumps({"image": image, "instruction": instruction, "unnorm_key": key})
    status, _, data = _http(served.port, "POST", "/act", json.dumps({"encoded": inner}).encode())
    assert status == 200 and isinstance(json.loads(data), str)
    np.testing.assert_allclose(json_numpy.loads(json.loads(data)), want, rtol=0, atol=1e-6)


def test_serve_plain_json_and_base64_forms_agree(served, expected):
    image, instruction, key, want = _case(expected, 0)
    body = json.dumps({"image": image.tolist(), "instruction": instruction, "unnorm_key": key}).encode()
    status, headers, data = _http(served.port, "POST", "/act", body)
    assert status == 200 and headers["Content-Type"] == "application/json" and isinstance(json.loads(data), list)
    np.testing.assert_allclose(json.loads(data), want, rtol=0, atol=1e-6)
    image, instruction, key, want = _case(expected, 1)
    for text in (_png_b64(image), "data:image/png;base64," + _png_b64(image)):  # PNG is lossless: same pixels
        status, _, data = _http(served.port, "POST", "/act", json.dumps(
            {"image": text, "instruction": instruction, "unnorm_key": key}).encode())
        assert status == 200, data
        np.testing.assert_allclose(json.loads(data), want, rtol=0, atol=1e-6)
    # JPEG is lossy: the answer must equal the one for the pixels PIL decodes from it
    image, instruction, key, _ = _case(expected, 2)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(jpeg := _png_b64(image, "JPEG")))).convert("RGB"))
    status, _, data = _http(served.port, "POST", "/act", json.dumps(
        {"image": jpeg, "instruction": instruction, "unnorm_key": key}).encode())
    assert status == 200 and json.loads(data) == _act_json_numpy(served.port, decoded, instruction, key).tolist()


def test_serve_usage_health_token_and_http_hygiene(served):
    status, headers, data = _http(served.port, "GET", "/", token=None)  # the usage text needs no token
    assert status == 200 and headers["Content-Type"].startswith("text/plain") and b"POST" in data and b"/act" in data
    for token, (method, path) in itertools.product((None, "wrong"), (("GET", "/health"), ("POST", "/act"))):
        status, headers, data = _http(served.port, method, path, b"{}", token=token)
        assert status == 401 and headers.get("WWW-Authenticate") == "Bearer", (method, path, token)
        assert "token" in json.loads(data)["error"]
    status, _, data = _http(served.port, "GET", "/health", token=None, headers={"Authorization": "bearer test-token"})
    health = json.loads(data)  # the scheme is case-insensitive; the path is shown only to a client with the token
    assert status == 200 and health["status"] == "ok" and health["device"] == "cpu" and health["dtype"] == "float32"
    assert health["unnorm_keys"] == ["bridge_orig", "libero_spatial_no_noops"] and health["uptime_s"] >= 0
    assert health["model"] == "openvla-tiny" and health["checkpoint"] == str(FIXTURE)
    assert _http(served.port, "HEAD", "/health")[::2] == (200, b"")
    reply = _raw(served.port, b"GARBAGE\r\n\r\n")  # a malformed request line still gets a status line
    assert reply.startswith(b"HTTP/1.1 400 ") and b'"error"' in reply
    _raw(served.port, b"GET /\x1b[2Jx HTTP/1.1\r\nConnection: close\r\n\r\n")  # an escape sequence in the path
    time.sleep(0.3)
    assert any("/\\x1b[2Jx" in line for line in served.lines) and not any("\x1b" in line for line in served.lines)
    body = json.dumps({"image": [[[0, 0, 0]]], "instruction": "go", "unnorm_key": "bridge_orig"}).encode()
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:  # curl's Expect: 100-continue
        s.sendall(b"POST /act HTTP/1.1\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\nExpect: 100-continue\r\n"
                  b"Connection: close\r\n\r\n" % (SERVE_TOKEN.encode(), len(body)))
        assert s.recv(1 << 16).startswith(b"HTTP/1.1 100 ")
        s.sendall(body)
        assert s.recv(1 << 16).startswith(b"HTTP/1.1 200 ")


def test_serve_rejects_bad_input_and_keeps_serving(served, expected, tmp_path):
    image, instruction, key, want = _case(expected, 0)
    nj = lambda **fields: json_numpy.dumps({"image": image, "instruction": instruction, "unnorm_key": key, **fields})
    raw = lambda data, dtype, shape: {"__numpy__": base64.b64encode(data).decode(), "dtype": dtype, "shape": shape}
    big, pickled = np.zeros((600, 600, 3), np.uint8), b"cos\nsystem\n(S'touch %s'\ntR." % str(tmp_path / "x").encode()
    bad = [  # (method, path, body, status, words the error must contain)
        ("POST", "/act", b'{"image": [1, 2', 400, "not valid JSON"),
        ("POST", "/act", b"\xff\xfe\x00garbage", 400, "not valid JSON"),
        ("POST", "/act", b"[1, 2, 3]", 400, "not an object"),
        ("POST", "/act", json_numpy.dumps({"image": image, "unnorm_key": key}), 400, "missing field 'instruction'"),
        ("POST", "/act", json.dumps({"instruction": "go", "unnorm_key": key}), 400, "missing field 'image'"),
        ("POST", "/act", nj(instruction=5), 400, "'instruction' must be a string, not int"),
        ("POST", "/act", nj(instruction="   "), 400, "instruction is empty"),
        ("POST", "/act", nj(instruction="a" * 5000), 400, "5000 bytes"),
        ("POST", "/act", nj(unnorm_key="nope"), 400, "libero_spatial_no_noops"),
        ("POST", "/act", nj(unnorm_key=None), 400, "bridge_orig"),  # two datasets: the key may not be left out
        ("POST", "/act", nj(unnorm_key=3), 400, "'unnorm_key' must be a string, not int"),
        ("POST", "/act", nj(image=image[..., 0]), 400, "shape (224, 224)"),
        ("POST", "/act", nj(image=np.zeros((8, 8, 4), np.uint8)), 400, "shape (8, 8, 4)"),
        ("POST", "/act", nj(image=image.astype(np.float32)), 400, "dtype is float32"),
        ("POST", "/act", nj(image=big), 400, "600x600"),
        ("POST", "/act", nj(image=raw(pickled, "|O", [1])), 400, "not a plain numeric"),  # never unpickled
        ("POST", "/act", nj(image=raw(pickled, "O", [1])), 400, "not a plain numeric"),
        ("POST", "/act", nj(image=raw(pickled, [["a", "|O"]], [1])), 400, "not a plain numeric"),
        ("POST", "/act", nj(image=raw(b"abc", "|u1", [2, 2, 3])), 400, "does not decode"),
        ("POST", "/act", nj(image=raw(b"", "|u1", [0, 10**30, 3])), 400, "does not decode"),
        ("POST", "/act", nj(image=raw(b"", "|u1", [2**62, 0, 3])), 400, "does not decode"),
        ("POST", "/act", nj(image=raw(b"", "|u1", [1] * 65)), 400, "bad json_numpy shape"),
        ("POST", "/act", nj(image={"__numpy__": "%%%", "dtype": "|u1", "shape": [1]}), 400, "does not decode"),
        ("POST", "/act", nj(image=[[[0.5, 0.5, 0.5]]]), 400, "ints 0..255"),
        ("POST", "/act", nj(image=[[[300, 0, 0]]]), 400, "ints 0..255"),
        ("POST", "/act", nj(image=[[[1, 2, 3]], [[1, 2]]]), 400, "rectangular"),
        ("POST", "/act", nj(image="bm90IGFuIGltYWdl"), 400, "PNG or JPEG"),
        ("POST", "/act", nj(image=_png_b64(big)), 400, "600x600"),
        ("POST", "/act", nj(image=5), 400, "'image' must be an array, a list or a string, not int"),
        ("POST", "/act", json.dumps({"encoded": 5}), 400, "'encoded' must be a string"),
        ("POST", "/predict", nj(), 404, "no route /predict"),
        ("GET", "/act", None, 405, "GET /act is not allowed"),
        ("PUT", "/act", nj(), 405, "PUT /act is not allowed"),
        ("BREW", "/act", None, 405, "BREW not allowed"),
    ]
    for method, path, body, status, words in bad:
        body = body.encode() if isinstance(body, str) else body
        got, headers, data = _http(served.port, method, path, body)
        assert got == status and headers["Content-Type"] == "application/json", (method, path, words, got, data[:300])
        err = json.loads(data)
        assert words in err["error"] and err.get("expected"), (words, err)
    assert not (tmp_path / "x").exists()  # the pickle would have run `touch`
    # Content-Length too large (413, before the body is read), missing (411), '²' (isdigit() says yes), two differ
    post = b"POST /act HTTP/1.1\r\nAuthorization: Bearer %s\r\nConnection: close\r\n" % SERVE_TOKEN.encode()
    for lengths, status in (([b"1000000000"], 413), ([], 411), ([b"\xb2"], 400), ([b"2", b"3"], 400)):
        reply = _raw(served.port, post + b"".join(b"Content-Length: %s\r\n" % n for n in lengths) + b"\r\n{}")
        assert reply.startswith(b"HTTP/1.1 %d " % status) and b'"error"' in reply, (lengths, reply)
    np.testing.assert_allclose(_act_json_numpy(served.port, image, instruction, key), want, rtol=0, atol=1e-6)


def test_serve_16_concurrent_clients_are_batched_and_correct(served, expected):
    cases, start = [_case(expected, k) for k in range(4)], threading.Barrier(16)

    def client(i):
        image, instruction, key, want = cases[i % 4]
        start.wait(30)
        return _act_json_numpy(served.port, image, instruction, key), want

    batches = json.loads(_http(served.port, "GET", "/health")[2])["batches"]
    with ThreadPoolExecutor(16) as pool:
        for action, want in pool.map(client, range(16)):
            np.testing.assert_allclose(action, want, rtol=0, atol=1e-6)
    assert json.loads(_http(served.port, "GET", "/health")[2])["batches"] - batches < 16, "never batched"


def test_serve_sigterm_exits_promptly_with_a_client_trickling_headers(served):
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.sendall(b"POST /act HTTP/1.1\r\nX-Slow: ")  # and never more: its request thread blocks reading
        time.sleep(0.2)
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(10) == 0
    time.sleep(0.2)
    assert any("stopped after" in line for line in served.lines), "".join(served.lines[-5:])


class _FakeVLA:
    """Stands in for the model: records batch sizes, takes 0.5 s on 'slow', and breaks on 'explode'."""

    def __init__(self):
        self.norm_stats, self.batches, self.started, self.weight = {"fake": {}}, [], threading.Event(), torch.zeros(1)
        self.config = SimpleNamespace(vision=[SimpleNamespace(image_size=4)])
        self.threads = {threading.current_thread().name}  # where it was built, then where every call ran

    parameters = lambda self: iter([self.weight])  # noqa: E731

    def predict_actions(self, images, instructions, unnorm_key=None, proprio=None, center_crop=True):  # VLA's
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(images))
        self.started.set()
        time.sleep(0.5 if "slow" in instructions else 0.0)
        if "explode" in instructions:
            raise RuntimeError("boom")
        return np.array([[float(len(s))] * 7 for s in instructions])


@contextlib.contextmanager
def _fake_server(load=_FakeVLA, **config):
    server = serve.PolicyServer(serve.ServeConfig(port=0, **config))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.attach(load) if load else server
    finally:
        server.stop()


def _post(port, text, **kw):
    return _http(port, "POST", "/act", json.dumps({"image": [[[0, 0, 0]]], "instruction": text}).encode(), **kw)


def test_serve_model_failure_is_500_and_stop_finishes_requests_in_flight():
    with _fake_server(max_wait_ms=200, request_timeout_s=60) as server:
        fake, port = server.vla, server.server_address[1]
        with ThreadPoolExecutor(5) as pool:
            slow = pool.submit(_post, port, "slow")  # keeps the worker busy while the next four queue up: one batch
            assert fake.started.wait(10)
            results = list(pool.map(lambda text: _post(port, text), ["explode", "abc", "abcd", "abcde"]))
        assert slow.result()[0] == 200
        assert results[0][0] == 500 and "boom" in json.loads(results[0][2])["error"]  # the failing one fails alone
        assert [json.loads(r[2]) for r in results[1:]] == [[3.0] * 7, [4.0] * 7, [5.0] * 7]
        assert fake.batches == [1, 4, 1, 1, 1, 1], fake.batches
        # built and run on the one model thread: a second thread running torch ops would get its own OpenMP team
        assert fake.threads == {"model-worker"}, fake.threads
        fake.started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(_post, port, "slow")
            assert fake.started.wait(10)
            tricklers = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
            [s.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ") for s in tricklers]  # stop() must not wait a minute
            t = time.monotonic()
            server.stop()  # what SIGINT/SIGTERM run in main()
            assert in_flight.result(timeout=30)[0] == 200 and time.monotonic() - t < 5
        with pytest.raises(OSError):
            _post(port, "after stop")


def test_serve_health_is_503_loading_until_the_model_is_ready_and_load_errors_reach_the_caller():
    ready = threading.Event()
    with _fake_server(load=None) as server:
        attach = threading.Thread(target=server.attach, args=(lambda: ready.wait(30) and _FakeVLA(),))
        attach.start()
        port = server.server_address[1]
        status, _, data = _http(port, "GET", "/health")
        assert status == 503 and json.loads(data) == {"status": "loading", "model": "demo"}
        assert _post(port, "abc")[0] == 503
        ready.set()
        attach.join(10)
        assert _http(port, "GET", "/health")[0] == 200 and _post(port, "abc")[0] == 200

    def load():
        raise SystemExit("cannot load /nowhere: missing config.json")
    with pytest.raises(SystemExit, match="missing config.json"), _fake_server(load=load):  # re-raised for main()
        pass


def test_serve_bounds_time_connections_and_bytes_being_decoded():
    with _fake_server(request_timeout_s=1, max_connections=3, max_decode_bytes=100) as server:
        port, t = server.server_address[1], time.monotonic()
        assert _raw(port, b"GET /health HTTP/1.1\r\nX-Slow: ") == b""  # headers unfinished: cut at the deadline
        reply = _raw(port, b"POST /act HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}")  # a body that never comes
        assert reply.startswith(b"HTTP/1.1 408 ") and time.monotonic() - t < 6
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.3)
        assert _raw(port, b"GET /health HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503 ")  # a 4th: refused at once
        [s.close() for s in idle]
        time.sleep(0.3)
        assert _http(port, "GET", "/health")[0] == 200
        soon = lambda: time.monotonic() + 0.2
        with server.admit(60, soon()), server.admit(40, soon()):  # 100 bytes: the budget, together
            with pytest.raises(serve.HTTPError) as busy, server.admit(7, soon()):  # one more waits, then 503
                pass
            with server.admit(6, soon()):  # <= 1/16 of the budget (a camera frame): at once, beside big bodies
                assert server.decoding == 1 and server.heavy_bytes == 100
        assert busy.value.status == 503
        with server.admit(500, soon()):  # over the budget but alone: admitted
            pass
        body = json.dumps({"image": [[[1, 2, 3]] * 4] * 4, "instruction": "go"}).encode()
        assert server.offload(body, 2, time.monotonic() + 30)[0].shape == (2, 2, 3)  # parsed and resized there
        with pytest.raises(serve.HTTPError) as late:  # not parsed by its deadline: 503
            server.offload(body, 0, time.monotonic())
        [p.kill() for p in server.decoder._processes.values()]  # the decoder dies: 503, then a fresh one parses
        time.sleep(0.5)
        with pytest.raises(serve.HTTPError) as died:
            server.offload(body, 0, time.monotonic() + 30)
        assert late.value.status == died.value.status == 503 and "restarted" in json.loads(died.value.body)["error"]
        assert server.offload(body, 0, time.monotonic() + 30)[0].shape == (4, 4, 3)
        with pytest.raises(serve.HTTPError) as refused:  # its 400s cross from the decoder process intact
            server.offload(body.replace(b'"go"', b'""'), 0, time.monotonic() + 30)
        assert refused.value.status == 400 and "instruction is empty" in json.loads(refused.value.body)["error"]


def test_serve_big_bodies_and_images_parse_in_the_decoder_process():
    small = serve.ServeConfig(max_decode_bytes=16 * 2000)  # small: bodies over 2000 bytes are big
    cases = {(8, 8): (small, json_numpy.dumps, np.zeros((8, 8, 3), np.uint8), False),  # the big body: 4 KiB of base64
             (32, 32): (small, json_numpy.dumps, np.ones((32, 32, 3), np.uint8), True),  # default 1 MiB; lists by items
             (64, 64): (serve.ServeConfig(), json.dumps, [[[1, 2, 3]] * 64] * 64, False),
             (65, 64): (serve.ServeConfig(), json.dumps, [[[1, 2, 3]] * 64] * 65, True),  # > SMALL_LIST pixels
             (480, 640): (serve.ServeConfig(), json.dumps, _png_b64(np.zeros((480, 640, 3), np.uint8)), False),
             (481, 640): (serve.ServeConfig(), json.dumps, _png_b64(np.zeros((481, 640, 3), np.uint8)), True)}
    for shape, (config, dumps, image, offloaded) in cases.items():
        body = dumps({"image": image, "instruction": "go"}).encode()
        assert serve.parse_act(body, {"fake": {}}, config)[0].shape[:2] == shape  # as the decoder process parses it
        with contextlib.nullcontext() if not offloaded else pytest.raises(serve.Offload):
            assert serve.parse_act(body, {"fake": {}}, config, 0, True)[0].shape[:2] == shape


def test_line_budget_and_width():
    """The product files (every .py but the tests and the benchmarks) fit the reader's budget: <= 3,600 lines in all,
    none over 600, no line over 120 columns (test_vla.py and bench.py are held to the width too)."""
    product = {p.name: p.read_text().splitlines() for p in ROOT.glob("*.py")
               if p.name not in ("test_vla.py", "bench.py")}
    sizes = {name: len(lines) for name, lines in product.items()}
    assert sum(sizes.values()) <= 3600, sizes
    assert max(sizes.values()) <= 600, sizes
    wide = [(p.name, i + 1) for p in ROOT.glob("*.py") for i, line in enumerate(p.read_text().splitlines())
            if len(line) > 120]
    assert not wide, wide


if __name__ == "__main__":  # torchrun test_vla.py <check> <args>: one of the train section's multi-rank checks
    globals()[sys.argv[1]](*sys.argv[2:])
    train.finish(0)
