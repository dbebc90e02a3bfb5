"""What a client may see of a policy or tool spec (``ibisagent.specs``) and how the server scrubs its paths."""

from __future__ import annotations

import pytest

from ibisagent.server.redact import ServerPaths, conf_locations
from ibisagent.specs import public_spec, spec_locations

SPECS = [
    ("hf:/models/qwen", "hf:qwen", ("/models/qwen",)),
    ("hf:/models/qwen/", "hf:qwen", ("/models/qwen/",)),
    ("vllm:runs/sft/policy", "vllm:policy", ("runs/sft/policy",)),
    ("medsam2:/ckpt/x.pt", "medsam2:x.pt", ("/ckpt/x.pt",)),
    ("medsam:/ckpt/medsam_vit_b.pth", "medsam:medsam_vit_b.pth", ("/ckpt/medsam_vit_b.pth",)),
    ("sam2:configs/sam2.1/sam2.1_hiera_t.yaml@/ckpt/t.pt", "sam2:sam2.1_hiera_t.yaml@t.pt", ("/ckpt/t.pt",)),
    ("sam:vit_b@/ckpt/sam.pth", "sam:vit_b@sam.pth", ("/ckpt/sam.pth",)),
    ("medsam2:random", "medsam2:random", ()),
    ("openai:http://10.0.0.5:8000/v1#IBISAgent-7B", "openai:IBISAgent-7B", ("http://10.0.0.5:8000",)),
    ("openai:http://10.0.0.5:8000/v1#/models/IBISAgent-7B", "openai:IBISAgent-7B",
     ("http://10.0.0.5:8000", "/models/IBISAgent-7B")),
    ("openai:127.0.0.1:8000", "openai", ("http://127.0.0.1:8000",)),
    ("embedded", "embedded", ()),
    ("bundled", "bundled", ()),
    ("tiny", "tiny", ()),
    ("", "", ()),
]


@pytest.mark.parametrize(("spec", "public", "locations"), SPECS)
def test_public_spec_keeps_the_kind_and_file_name_only(spec: str, public: str, locations: tuple[str, ...]) -> None:
    assert public_spec(spec) == public
    assert spec_locations(spec) == locations
    for location in locations:
        if "://" not in location:
            assert location.rstrip("/") not in public


def test_conf_paths_and_their_folders_are_scrubbed_from_text() -> None:
    conf = {"policy": "openai:http://10.0.0.5:8000/v1#m", "tool": "medsam2:/ckpt/x.pt",
            "train_manifest": "/data/a/train.jsonl,/data/b/more.jsonl"}
    paths = ServerPaths(conf_locations(conf))
    text = ("checkpoint not found: /ckpt/x.pt; no reply from http://10.0.0.5:8000/v1 after 3 s; "
            "reading /data/b/cases/7.png")
    assert paths.scrub(text) == ("checkpoint not found: <server>/x.pt; no reply from <server>/v1 after 3 s; "
                                 "reading <server>/7.png")
    assert paths.scrub_json({"error": "/ckpt/x.pt", "steps": [{"e": "/data/a/train.jsonl"}], "n": 1}) == \
        {"error": "<server>/x.pt", "steps": [{"e": "<server>/train.jsonl"}], "n": 1}


def test_a_bare_relative_name_is_not_a_root_to_scrub() -> None:
    assert conf_locations({"policy": "hf:policy", "tool": "medsam2:/x.pt"}) == ["/x.pt"]


def test_relative_conf_paths_hide_their_absolute_form_and_leave_words_alone():
    import os

    from ibisagent.server.redact import ServerPaths, conf_locations

    paths = ServerPaths(conf_locations({"policy": "hf:models/qwen", "train_manifest": "data/train.jsonl"}))
    reply = '{"models": {"ibisagent": {}}, "data": 1, "datastore": "x", "note": "metadata"}'
    assert paths.scrub(reply) == reply  # /info's "models" key and ordinary words survive
    here = os.path.abspath("models")
    assert paths.scrub(f"cannot load {here}/qwen/config.json") == "cannot load <server>/config.json"
    assert paths.scrub(f"{here}2/x") == f"{here}2/x"  # a longer name is another path
