"""Pre-trained GPT-2 import: our safetensors reader, the Hugging Face GPT-2 layout mapping, parity with
transformers' GPT2LMHeadModel (skipped without transformers), and the cached download."""
import json
import pathlib
import random
import shutil
import struct

import pytest
import torch

import model as model_module
from model import GPT, GPTConfig, generate, gpt2_config, gpt2_safetensors, read_safetensors

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_safetensors(path, tensors, metadata=None):
    """A safetensors file written by hand: u64 header length, JSON header, raw little-endian data."""
    header, blobs, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        blob = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def hf_layout(model, prefix="transformer."):
    """Our GPT's weights renamed and transposed into the Hugging Face GPT-2 layout (Conv1D = (in, out)),
    with the causal-mask buffers an old-style checkpoint carries."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        name = name.removeprefix("transformer.")
        out[prefix + name] = t.t().contiguous() if name.endswith(CONV1D) else t.clone()
    for i in range(model.config.n_layer):
        out[f"{prefix}h.{i}.attn.bias"] = torch.ones(1, 1, 4, 4)  # buffers, to be skipped
    return out


def sharp_gpt(seed, **kw):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, gelu="tanh", **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    return m


# ---------------------------------------------------------------------------------------------- reader

def test_read_safetensors_by_hand(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(2, 3, generator=g),                       # F32
        "b": torch.randn(5, generator=g).half(),                   # F16 (10 bytes: the next one is misaligned)
        "c": torch.randn(3, 2, generator=g).to(torch.bfloat16),    # BF16
        "d": torch.tensor([[1, -2], [3, 2**40]], dtype=torch.int64),  # I64
        "e": torch.zeros(0, 4),                                    # empty
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    got = read_safetensors(path)
    assert sorted(got) == sorted(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k], t), k
    assert got["b"].tolist() != got["a"].flatten()[:5].tolist()


@pytest.mark.parametrize("kind", ["truncated", "random", "tiny", "not_json"])
def test_read_safetensors_rejects_bad_files(tmp_path, kind):
    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"w": torch.arange(12, dtype=torch.float32).view(3, 4)})
    data = good.read_bytes()
    bad = tmp_path / f"{kind}.bin"
    bad.write_bytes({"truncated": data[:-5],
                     "random": random.Random(0).randbytes(1000),
                     "tiny": b"\x01\x02\x03",
                     "not_json": struct.pack("<Q", 4) + b"\xff{}x" + b"\0" * 8}[kind])
    with pytest.raises(ValueError) as e:
        read_safetensors(bad)
    msg = str(e.value)
    assert str(bad) in msg and "not a valid safetensors file" in msg and "\n" not in msg
    if kind == "truncated":
        assert "truncated" in msg


# ---------------------------------------------------------------------------------------------- mapping

@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_from_gpt2_roundtrip_hf_layout(tmp_path, prefix):
    """Our weights written in the HF layout (transposed Conv1D, with or without 'transformer.', mask
    buffers, a tied lm_head) come back as the same model with the same logits."""
    ref = sharp_gpt(0)
    sd = hf_layout(ref, prefix)
    sd["lm_head.weight"] = ref.transformer.wte.weight.detach().clone()
    write_safetensors(tmp_path / "model.safetensors", sd)
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 2, "n_positions": 16, "layer_norm_epsilon": 1e-5}))
    m = GPT.from_gpt2(str(tmp_path / "model.safetensors")).eval()
    assert m.config == ref.config
    assert m.lm_head.weight is m.transformer.wte.weight
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m(idx)[0], ref(idx)[0], rtol=0, atol=0)


def test_from_gpt2_clear_errors(tmp_path):
    ref = sharp_gpt(0)
    sd = hf_layout(ref)
    path = tmp_path / "model.safetensors"
    write_safetensors(path, sd)
    with pytest.raises(ValueError, match="config.json"):  # n_embd 16 is no known GPT-2: n_head unknown
        GPT.from_gpt2(str(path))
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 2}))
    del sd["transformer.h.1.mlp.c_fc.bias"]
    write_safetensors(path, sd)
    with pytest.raises(ValueError, match=r"missing \['transformer\.h\.1\.mlp\.c_fc\.bias'\]"):
        GPT.from_gpt2(str(path))
    sd = hf_layout(ref)
    sd["transformer.h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"].t().contiguous()  # not Conv1D
    sd["transformer.h.0.extra.weight"] = torch.zeros(2)
    write_safetensors(path, sd)
    unexpected = r"unexpected \['transformer\.h\.0\.extra\.weight'\], wrong shapes \['transformer\.h\.0\.attn\.c_attn"
    with pytest.raises(ValueError, match=unexpected):
        GPT.from_gpt2(str(path))
    sd = hf_layout(ref)
    sd["lm_head.weight"] = torch.zeros(40, 16)  # an untied head would be silently lost
    write_safetensors(path, sd)
    with pytest.raises(ValueError, match="not tied"):
        GPT.from_gpt2(str(path))


@pytest.mark.parametrize("n_embd, n_head, n_layer", [(768, 12, 12), (1024, 16, 24), (1280, 20, 36), (1600, 25, 48)])
def test_gpt2_config_known_sizes(n_embd, n_head, n_layer):
    """Without config.json the real GPT-2 sizes get their n_head from the table (shapes only: meta tensors)."""
    sd = {"transformer.wte.weight": torch.empty(50257, n_embd, device="meta"),
          "transformer.wpe.weight": torch.empty(1024, n_embd, device="meta"),
          "transformer.ln_f.bias": torch.empty(n_embd, device="meta")}
    sd.update({f"transformer.h.{i}.ln_1.weight": torch.empty(n_embd, device="meta") for i in range(n_layer)})
    assert gpt2_config(sd) == GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head,
                                        n_embd=n_embd, dropout=0.0, bias=True, gelu="tanh")
    with pytest.raises(ValueError, match="layer_norm_epsilon"):
        gpt2_config(sd, {"layer_norm_epsilon": 1e-6})


def test_default_gelu_is_exact():
    """The new config field keeps the original model (exact erf GELU) by default."""
    assert GPT(GPTConfig(n_layer=1)).transformer.h[0].mlp.gelu.approximate == "none"


# ---------------------------------------------------------------------------------------------- parity

@pytest.fixture
def hf_tiny(tmp_path):
    """A tiny random transformers GPT2LMHeadModel (large weights, so every detail shows in the logits),
    saved with save_pretrained (model.safetensors + config.json) and loaded into our GPT."""
    transformers = pytest.importorskip(
        "transformers", reason="needs transformers: pip install -r requirements-dev.txt")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100,
                                  bos_token_id=99, eos_token_id=99, pad_token_id=99)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    ours = GPT.from_gpt2(str(tmp_path)).eval()
    return hf, ours, tmp_path


@pytest.mark.slow  # imports transformers
def test_gpt2_logits_match_transformers(hf_tiny):
    hf, ours, path = hf_tiny
    assert ours.config == GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=2, n_embd=32,
                                    dropout=0.0, bias=True, gelu="tanh")
    idx = torch.randint(0, 100, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)[0]
    print(f"max |logit diff| = {(got - ref).abs().max().item():.3g} (logit std {ref.std().item():.3g})")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # our reader agrees with the reference safetensors package on transformers' own file
    safetensors_torch = pytest.importorskip(
        "safetensors.torch", reason="needs safetensors (installed with transformers: requirements-dev.txt)")
    theirs, mine = (load(path / "model.safetensors") for load in (safetensors_torch.load_file, read_safetensors))
    assert sorted(theirs) == sorted(mine)
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)


@pytest.mark.slow  # imports transformers
def test_gpt2_greedy_generation_matches_transformers(hf_tiny):
    hf, ours, _ = hf_tiny
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 99, (n,), generator=g).tolist() for n in (5, 9, 1)]
    tokens, lengths = generate(ours, prompts, n_samples=1, max_new_tokens=30, eos_id=99, temperature=0)
    seen = set()
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=30, eos_token_id=99, pad_token_id=99)
        ref = out[0, len(p):].tolist()
        assert tokens[i, :lengths[i]].tolist() == ref, f"prompt {i}"
        seen.update(ref)
    assert len(seen) > 5  # the continuations are not degenerate


# ---------------------------------------------------------------------------------------------- download

def test_gpt2_safetensors_download_is_atomic_and_cached(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    (hub / "gpt2" / "resolve" / "main").mkdir(parents=True)
    src = hub / "gpt2" / "resolve" / "main"
    write_safetensors(src / "model.safetensors", {"w": torch.arange(6, dtype=torch.float32)})
    (src / "config.json").write_text(json.dumps({"n_head": 12}))
    monkeypatch.setattr(model_module, "GPT2_URL_BASE", hub.as_uri())
    cache = tmp_path / "cache"
    real_copy, seen = shutil.copyfileobj, []

    def spy_copy(src, dst, length=0):  # what the cache folder holds while a file is being written
        seen.append((pathlib.Path(dst.name).name, sorted(p.name for p in (cache / "gpt2").iterdir())))
        real_copy(src, dst, length)
    monkeypatch.setattr(model_module.shutil, "copyfileobj", spy_copy)

    path = gpt2_safetensors("gpt2", str(cache))
    assert seen == [("config.json.tmp", ["config.json.tmp"]),
                    ("model.safetensors.tmp", ["config.json", "model.safetensors.tmp"])]
    assert path == str(cache / "gpt2" / "model.safetensors")
    assert (cache / "gpt2" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (cache / "gpt2" / "config.json").read_text() == (src / "config.json").read_text()
    assert sorted(p.name for p in (cache / "gpt2").iterdir()) == ["config.json", "model.safetensors"]  # no .tmp

    for f in src.iterdir():  # the second call must not download again
        f.unlink()
    assert gpt2_safetensors("gpt2", str(cache)) == path
    assert torch.equal(read_safetensors(path)["w"], torch.arange(6, dtype=torch.float32))

    assert gpt2_safetensors(path, "unused") == path  # an existing file is returned as is
    with pytest.raises(RuntimeError, match=r"cannot download gpt2-medium \(.*\); download model\.safetensors "
                                           r"yourself and pass --init_from=PATH/model\.safetensors"):
        gpt2_safetensors("gpt2-medium", str(cache))
    assert list((cache / "gpt2-medium").iterdir()) == []  # nothing half-written left behind
    def broken_copy(src, dst, length=0):  # the connection drops half-way through
        dst.write(src.read(3))
        raise ConnectionResetError("connection reset by peer")
    (hub / "gpt2-large" / "resolve" / "main").mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (hub / "gpt2-large" / "resolve" / "main" / f).write_bytes(b"0123456789")
    monkeypatch.setattr(model_module.shutil, "copyfileobj", broken_copy)
    with pytest.raises(RuntimeError, match=r"cannot download gpt2-large \(.*connection reset by peer\)"):
        gpt2_safetensors("gpt2-large", str(cache))
    assert list((cache / "gpt2-large").iterdir()) == []
    with pytest.raises(ValueError, match="neither a model.safetensors file nor one of"):
        gpt2_safetensors("gpt3", str(cache))
