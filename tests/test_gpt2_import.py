"""Pre-trained GPT-2 import: our safetensors reader, the Hugging Face GPT-2 layout mapping, parity with
transformers' GPT2LMHeadModel (skipped without transformers), and the cached download."""
import hashlib
import io
import json
import pathlib
import random
import re
import struct
import threading
import time
import types
import urllib.error

import pytest
import torch

import gpt2
from gpt2 import from_gpt2, gpt2_config, gpt2_safetensors, read_safetensors
from model import GPT, GPTConfig, generate

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


def forged_safetensors(path, offsets, body):
    """A file whose header says what offsets says, whatever its body holds."""
    header = {name: {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}
              for name, (begin, end) in offsets.items()}
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)


@pytest.mark.parametrize("offsets, n_body, what", [
    ({"a": (0, 16), "b": (8, 24)}, 24, "overlap"),                   # two tensors read the same bytes
    ({"a": (0, 8), "b": (16, 24)}, 24, "leave a gap"),               # bytes no tensor owns
    ({"a": (0, 8)}, 16, "8 data bytes after the last tensor"),       # bytes after the last one
    ({"b": (8, 16), "a": (0, 8), "c": (0, 0)}, 16, None),            # out of order, and empty: fine
])
def test_read_safetensors_byte_ranges_tile_the_data(tmp_path, offsets, n_body, what):
    path = tmp_path / "forged.safetensors"
    forged_safetensors(path, offsets, bytes(range(n_body)))
    if what is None:
        assert sorted(read_safetensors(path)) == ["a", "b", "c"]
        return
    with pytest.raises(ValueError, match=what) as e:
        read_safetensors(path)
    assert str(path) in str(e.value) and "not a valid safetensors file" in str(e.value)


def test_from_gpt2_refuses_integer_or_non_finite_weights_and_bad_config(tmp_path):
    ref = sharp_gpt(0)
    path = tmp_path / "model.safetensors"
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 2}))
    sd = hf_layout(ref)
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"].long()
    write_safetensors(path, sd)
    with pytest.raises(ValueError, match=r"weights must be floating point, but transformer\.wpe\.weight"):
        from_gpt2(str(path))
    sd = hf_layout(ref)
    sd["transformer.h.1.mlp.c_fc.bias"][3] = float("nan")
    write_safetensors(path, sd)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias hold NaN or infinite values"):
        from_gpt2(str(path))
    write_safetensors(path, hf_layout(ref))
    for text, message in [("{not json", "is not a readable JSON file"), ("[2]", "holds a JSON list, not an object"),
                          ('{"n_head": "2"}', "n_head = '2' must be a positive integer"),
                          ('{"n_head": 0}', "n_head = 0 must be a positive integer"),
                          ('{"n_head": 3}', "n_head 3 does not divide n_embd 16"),
                          ('{"n_head": 2, "layer_norm_epsilon": null}', "layer_norm_epsilon = None must be")]:
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            from_gpt2(str(path))
        assert "config.json" in str(e.value) and "\n" not in str(e.value)


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
    m = from_gpt2(str(tmp_path / "model.safetensors")).eval()
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
        from_gpt2(str(path))
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 2}))
    del sd["transformer.h.1.mlp.c_fc.bias"]
    write_safetensors(path, sd)
    with pytest.raises(ValueError, match=r"missing \['transformer\.h\.1\.mlp\.c_fc\.bias'\]"):
        from_gpt2(str(path))
    sd = hf_layout(ref)
    sd["transformer.h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"].t().contiguous()  # not Conv1D
    sd["transformer.h.0.extra.weight"] = torch.zeros(2)
    write_safetensors(path, sd)
    unexpected = r"unexpected \['transformer\.h\.0\.extra\.weight'\], wrong shapes \['transformer\.h\.0\.attn\.c_attn"
    with pytest.raises(ValueError, match=unexpected):
        from_gpt2(str(path))
    sd = hf_layout(ref)
    sd["lm_head.weight"] = torch.zeros(40, 16)  # an untied head would be silently lost
    write_safetensors(path, sd)
    with pytest.raises(ValueError, match="not tied"):
        from_gpt2(str(path))


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
    hf.save_pretrained(tmp_path)  # model.safetensors: the only format transformers 5 writes
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    ours = from_gpt2(str(tmp_path)).eval()
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

class FakeResponse(io.BytesIO):
    """What urlopen returns, for a test: the body, a Content-Length header (announced may differ from
    the body: a connection that drops), and an optional pause in each read (a slow network)."""
    def __init__(self, body, announced=None, pause=0.0, on_read=None):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body) if announced is None else announced)}
        self.pause, self.on_read = pause, on_read

    def read(self, n=-1):
        if self.on_read:
            self.on_read()
        time.sleep(self.pause)
        return super().read(min(n, 7) if n > 0 else n)  # a few bytes at a time

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hugging Face hub: files[name/file] = bytes, served by a patched urlopen; the published
    (bytes, sha256) of gpt2's files are this hub's, so that the checks run on them."""
    files, served = {}, []
    w = torch.arange(6, dtype=torch.float32)
    write_safetensors(tmp_path / "w.safetensors", {"w": w})
    files["gpt2/model.safetensors"] = (tmp_path / "w.safetensors").read_bytes()
    files["gpt2/config.json"] = json.dumps({"n_head": 12}).encode()
    hub = types.SimpleNamespace(files=files, served=served, announced={}, pause=0.0, on_read=None)

    def urlopen(url, timeout=None):
        key = url.split("://hub/")[1].replace("/resolve/main/", "/")
        if key not in files:
            raise urllib.error.URLError("404 not found")
        served.append(key)
        return FakeResponse(files[key], hub.announced.get(key), hub.pause, hub.on_read)
    monkeypatch.setattr(gpt2, "GPT2_URL_BASE", "https://hub")
    monkeypatch.setattr(gpt2.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(gpt2, "GPT2_PUBLISHED", {
        k: (len(v), hashlib.sha256(v).hexdigest()) for k, v in files.items()})
    return hub


def listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_gpt2_download_is_atomic_checked_and_cached(tmp_path, hub):
    cache = tmp_path / "cache"
    seen = []
    hub.on_read = lambda: seen.append(listing(cache / "gpt2"))  # what the folder holds mid-download
    path = gpt2_safetensors("gpt2", str(cache))
    assert path == str(cache / "gpt2" / "model.safetensors")
    assert hub.served == ["gpt2/config.json", "gpt2/model.safetensors"]
    assert all(n.endswith(".tmp") or n.startswith("config.json") for names in seen for n in names)
    assert not any("model.safetensors" == n for names in seen for n in names)  # never half there
    assert listing(cache / "gpt2") == ["config.json", "config.json.sha256", "model.safetensors",
                                       "model.safetensors.sha256"]
    assert (cache / "gpt2" / "model.safetensors").read_bytes() == hub.files["gpt2/model.safetensors"]
    hub.served.clear()
    assert gpt2_safetensors("gpt2", str(cache)) == path and hub.served == []  # reused, not downloaded
    assert torch.equal(read_safetensors(path)["w"], torch.arange(6, dtype=torch.float32))
    assert gpt2_safetensors(path, "unused") == path  # an existing file is returned as is
    with pytest.raises(ValueError, match="neither a model.safetensors file nor one of"):
        gpt2_safetensors("gpt3", str(cache))


@pytest.mark.parametrize("damage", ["truncated", "edited", "no_record"])
def test_gpt2_damaged_cache_is_never_used(tmp_path, hub, damage, capsys):
    cache = tmp_path / "cache"
    path = pathlib.Path(gpt2_safetensors("gpt2", str(cache)))
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[:-10])
    elif damage == "edited":  # same length, one byte changed
        path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    else:  # an unpinned model whose record of its download is gone
        hub.files["gpt2-medium/model.safetensors"] = hub.files["gpt2/model.safetensors"]
        hub.files["gpt2-medium/config.json"] = hub.files["gpt2/config.json"]
        path = pathlib.Path(gpt2_safetensors("gpt2-medium", str(cache)))
        (cache / "gpt2-medium" / "model.safetensors.sha256").unlink()
    hub.served.clear()
    name = path.parent.name
    assert gpt2_safetensors(name, str(cache)) == str(path)
    assert hub.served == [f"{name}/model.safetensors"]  # downloaded again, and only that file
    assert path.read_bytes() == good
    if damage != "no_record":
        assert "is damaged or incomplete: downloading it again" in capsys.readouterr().out


def test_gpt2_bad_downloads_leave_nothing(tmp_path, hub, monkeypatch):
    cache = tmp_path / "cache"
    body = hub.files["gpt2/model.safetensors"]
    hub.announced["gpt2/model.safetensors"] = len(body) + 100  # the connection drops before the end
    with pytest.raises(ValueError, match=rf"stopped at {len(body)} of {len(body) + 100} bytes; run again"):
        gpt2_safetensors("gpt2", str(cache))
    assert listing(cache / "gpt2") == ["config.json", "config.json.sha256"]  # no model, no .tmp
    hub.announced.clear()
    hub.files["gpt2/model.safetensors"] = body[:-1] + b"\0"  # whole, but not the published file
    with pytest.raises(ValueError, match="is not the published file"):
        gpt2_safetensors("gpt2", str(cache))
    assert listing(cache / "gpt2") == ["config.json", "config.json.sha256"]
    with pytest.raises(RuntimeError, match=r"cannot download gpt2-large \(.*404 not found.*\); download "
                                           r"model\.safetensors yourself and pass --init_from=PATH/model\.safetensors"):
        gpt2_safetensors("gpt2-large", str(cache))
    assert listing(cache / "gpt2-large") == []


def test_concurrent_downloads_do_not_mix(tmp_path, hub):
    """Two processes (here threads) fetching one file at once each write a temporary file of their
    own; the file kept is whole either way."""
    cache = tmp_path / "cache"
    hub.pause = 0.01
    temps = set()
    hub.on_read = lambda: temps.update(n for n in listing(cache / "gpt2") if n.endswith(".tmp"))
    errors = []

    def fetch():
        try:
            gpt2_safetensors("gpt2", str(cache))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)
    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({t for t in temps if t.startswith("model.safetensors.")}) == 2  # one temporary name each
    assert (cache / "gpt2" / "model.safetensors").read_bytes() == hub.files["gpt2/model.safetensors"]
    assert not any(n.endswith(".tmp") for n in listing(cache / "gpt2"))
