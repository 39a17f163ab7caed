"""
Pre-trained GPT-2 weights for model.GPT: a model.safetensors file in the Hugging Face GPT-2
layout, read by our own safetensors reader (no transformers, no safetensors package), its
tensors renamed into our state_dict, and the official checkpoints downloaded once and checked.

API
    from_gpt2(name_or_path, cache_dir=None, dropout=0.0)  -> a model.GPT with the GPT-2 weights
    gpt2_safetensors(name_or_path, cache_dir=None)  -> local path (downloads gpt2..gpt2-xl if needed)
    read_safetensors(path)         -> {name: tensor}
    read_hf_config(path)           -> a Hugging Face config.json as a dict, its fields checked
    gpt2_state_dict(tensors)       -> our state_dict (renamed, Conv1D weights transposed)
    gpt2_config(state_dict, hf_config=None, dropout=0.0)  -> GPTConfig
    load_strict(model, state_dict, path)  -> fill every parameter of model, or a ValueError
    cached_file_ok(path, published=None), download(url, dst, name, published=None)
                                   -> the download cache: whole and unchanged files only
"""
import hashlib
import json
import math
import os
import re
import sys
import urllib.request
from pathlib import Path

import torch

from checkpoint import atomic_write  # every file the project writes
from model import GPT, GPTConfig

GPT2_URL_BASE = "https://huggingface.co"  # files are fetched from {GPT2_URL_BASE}/{name}/resolve/main/{file}
GPT2_CACHE_DIR = os.path.join("~", ".cache", "gpt2-safetensors")  # default download folder
GPT2_N_HEAD = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # n_embd -> n_head: gpt2, -medium, -large, -xl
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# (bytes, sha256) of files as published, checked on download and on every reuse; the other models'
# files are checked against the length the server announces, and what was downloaded is recorded
GPT2_PUBLISHED = {
    "gpt2/model.safetensors": (548105171, "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
    "gpt2/config.json": (665, "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4"),
}
GPT2_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF activation -> ours
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def from_gpt2(name_or_path, cache_dir=None, dropout=0.0):
    """Our GPT with pre-trained GPT-2 weights: name_or_path is gpt2 / gpt2-medium / gpt2-large /
    gpt2-xl (downloaded once into cache_dir) or a local model.safetensors in the Hugging Face
    layout (or a folder holding one); a config.json beside it is read if present.
    Full GPT-2 vocabulary (50257 for the real models), tanh GELU, every parameter filled."""
    path = gpt2_safetensors(name_or_path, cache_dir)
    sd = gpt2_state_dict(read_safetensors(path))
    config_json = os.path.join(os.path.dirname(path), "config.json")
    hf_config = read_hf_config(config_json) if os.path.isfile(config_json) else None
    try:
        config = gpt2_config(sd, hf_config, dropout)
    except ValueError as e:
        raise ValueError(f"{path}{' with ' + config_json if hf_config else ''}: {e}") from None
    model = GPT(config)
    load_strict(model, sd, path)
    return model



def read_safetensors(path):
    """All tensors of a .safetensors file as {name: tensor} (CPU, views of one buffer holding the file).
    Format: 8-byte little-endian unsigned header length N, N bytes of JSON {name: {"dtype", "shape",
    "data_offsets": [begin, end]}} (offsets relative to the byte after the header, plus an optional
    "__metadata__"), then the raw little-endian data. Raises ValueError naming the file if it is not one."""
    assert sys.byteorder == "little", "read_safetensors assumes a little-endian machine"
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)  # writable, so torch.frombuffer can share it
        f.readinto(data)

    def bad(why):
        return ValueError(f"{path}: not a valid safetensors file: {why}")

    if len(data) < 8:
        raise bad(f"only {len(data)} bytes, fewer than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise bad(f"header length {n} runs past the end of the file ({len(data)} bytes; truncated?)")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:  # bad UTF-8 or bad JSON
        raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + n:]
    check_layout(header, len(body), bad)
    tensors = {}
    for name, info in header.items():
        dtype, shape, begin, end = safetensors_entry(info)
        nbytes = end - begin
        flat = torch.frombuffer(body[begin:end], dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        if flat.data_ptr() % dtype.itemsize:
            flat = flat.clone()  # misaligned data: copy into an aligned buffer
        tensors[name] = flat.view(shape)
    return tensors


def check_layout(header, n_bytes, bad):
    """The format's rule: the tensors' byte ranges, in order, tile the n_bytes of data exactly,
    with no overlap, no gap and nothing after the last (a file that breaks it was not written by a
    safetensors writer, or was edited). bad(why) -> the exception to raise."""
    spans = []
    for name, info in header.items():
        entry = safetensors_entry(info)
        if entry is None:
            raise bad(f"tensor {name!r} has a bad or unsupported entry {info}")
        dtype, shape, begin, end = entry
        if not (begin <= end <= n_bytes and end - begin == math.prod(shape) * dtype.itemsize):
            raise bad(f"tensor {name!r}: data_offsets {[begin, end]} do not fit {math.prod(shape) * dtype.itemsize} "
                      f"bytes of {info['dtype']} {shape} in {n_bytes} data bytes (truncated?)")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise bad(f"tensor {name!r} starts at data byte {begin}, not {at}: tensors "
                      f"{'overlap' if begin < at else 'leave a gap'}")
        at = end
    if at != n_bytes:
        raise bad(f"{n_bytes - at} data bytes after the last tensor")


def safetensors_entry(info):
    """(dtype, shape, begin, end) of one safetensors header entry; None if malformed or of an unknown dtype."""
    try:
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        return None
    ok = all(isinstance(x, int) and x >= 0 for x in (begin, end, *shape))
    return (dtype, shape, begin, end) if ok else None


# config.json fields we read, and the values each may hold
HF_CONFIG_FIELDS = {"n_head": (lambda v: type(v) is int and v > 0, "a positive integer"),
                    "n_positions": (lambda v: type(v) is int and v > 0, "a positive integer"),
                    "n_ctx": (lambda v: type(v) is int and v > 0, "a positive integer"),
                    "layer_norm_epsilon": (lambda v: type(v) in (int, float) and v > 0, "a positive number"),
                    "activation_function": (lambda v: isinstance(v, str), "a string")}


def read_hf_config(path):
    """The Hugging Face config.json at path as a dict, its fields checked (HF_CONFIG_FIELDS);
    a ValueError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise ValueError(f"{path} is not a readable JSON file ({e}); fix it, or delete it") from None
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path} holds a JSON {type(hf_config).__name__}, not an object; fix it, or delete it")
    for key, (ok, what) in HF_CONFIG_FIELDS.items():
        if key in hf_config and not ok(hf_config[key]):
            raise ValueError(f"{path}: {key} = {hf_config[key]!r} must be {what}; fix it, or delete it")
    return hf_config


def gpt2_state_dict(tensors):
    """Hugging Face GPT-2 tensors -> our state_dict: names get the "transformer." prefix (HF files
    have it or not), the Conv1D weights (c_attn, c_proj, c_fc stored (in, out)) are transposed into
    nn.Linear's (out, in), the attention-mask buffers are dropped, and lm_head is tied to wte."""
    sd = {}
    for name, t in tensors.items():
        name = name.removeprefix("transformer.")
        if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", name) or name == "lm_head.weight":
            continue  # causal-mask buffers; the output head is checked below
        if re.fullmatch(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight", name):
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        sd["transformer." + name] = t
    wte = sd.get("transformer.wte.weight")
    head = tensors.get("lm_head.weight")
    if head is not None and (wte is None or not torch.equal(head, wte)):
        raise ValueError("GPT-2 weights have an lm_head.weight that is not tied to wte.weight; "
                         "our GPT ties them")
    if wte is not None:
        sd["lm_head.weight"] = wte  # tied
    return sd


def gpt2_config(sd, hf_config=None, dropout=0.0):
    """GPTConfig of a GPT-2 state_dict (ours, from gpt2_state_dict): sizes from the tensors' shapes,
    n_head (which shapes cannot give) from the Hugging Face config.json dict hf_config if given,
    else from the known sizes gpt2 / gpt2-medium / gpt2-large / gpt2-xl."""
    hf_config = hf_config or {}
    if "transformer.wte.weight" not in sd or "transformer.wpe.weight" not in sd:
        raise ValueError("not GPT-2 weights: no wte.weight / wpe.weight tensor")
    vocab_size, n_embd = sd["transformer.wte.weight"].shape
    block_size = sd["transformer.wpe.weight"].shape[0]
    n_layer = sum(1 for k in sd if re.fullmatch(r"transformer\.h\.\d+\.ln_1\.weight", k))
    n_head = hf_config.get("n_head", GPT2_N_HEAD.get(n_embd))
    if n_head is None:
        raise ValueError(f"GPT-2 weights with n_embd={n_embd} are not one of gpt2..gpt2-xl, so n_head is "
                         f"unknown: put the model's config.json (with n_head) beside model.safetensors")
    if n_embd % n_head:
        raise ValueError(f"n_head {n_head} does not divide n_embd {n_embd}")
    n_pos = hf_config.get("n_positions", hf_config.get("n_ctx", block_size))
    eps = hf_config.get("layer_norm_epsilon", 1e-5)
    act = hf_config.get("activation_function", "gelu_new")
    if n_pos != block_size or eps != 1e-5 or act not in GPT2_GELU:
        raise ValueError(f"unsupported GPT-2 config: n_positions {n_pos} (wpe has {block_size} rows), "
                         f"layer_norm_epsilon {eps} (need 1e-5), activation_function {act!r} "
                         f"(need one of {list(GPT2_GELU)})")
    return GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                     n_embd=n_embd, dropout=dropout, bias="transformer.ln_f.bias" in sd, gelu=GPT2_GELU[act])


def load_strict(model, sd, path):
    """Copy sd into model; every parameter must be filled, with the right shape, and nothing left over."""
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    wrong = [f"{k} {tuple(sd[k].shape)} vs ours {tuple(ours[k].shape)}"
             for k in sorted(set(ours) & set(sd)) if sd[k].shape != ours[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: the weights do not fit our GPT: missing {missing}, "
                         f"unexpected {unexpected}, wrong shapes {wrong}")
    integer = [f"{k} ({sd[k].dtype})" for k in sorted(sd) if not sd[k].is_floating_point()]
    if integer:
        raise ValueError(f"{path}: weights must be floating point, but {', '.join(integer[:3])} are not")
    broken = [k for k in sorted(sd) if not torch.isfinite(sd[k]).all()]
    if broken:
        raise ValueError(f"{path}: {', '.join(broken[:3])} hold NaN or infinite values; the file is damaged")
    model.load_state_dict(sd)  # copies, casting F16/BF16 to the model's dtype


def gpt2_safetensors(name_or_path, cache_dir=None):
    """A local model.safetensors path: an existing file is returned as is (a folder: its
    model.safetensors); gpt2 / gpt2-medium / gpt2-large / gpt2-xl are downloaded with their
    config.json into cache_dir/NAME/ once, and reused after as long as they are unchanged
    (cached_file_ok); a damaged or incomplete cached file is downloaded again."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if os.path.isfile(os.path.join(name_or_path, "model.safetensors")):
        return os.path.join(name_or_path, "model.safetensors")
    if name_or_path not in GPT2_NAMES:
        raise ValueError(f"{name_or_path!r} is neither a model.safetensors file nor one of {list(GPT2_NAMES)}")
    folder = os.path.join(os.path.expanduser(cache_dir or GPT2_CACHE_DIR), name_or_path)
    os.makedirs(folder, exist_ok=True)
    for fname in ("config.json", "model.safetensors"):
        dst, published = os.path.join(folder, fname), GPT2_PUBLISHED.get(f"{name_or_path}/{fname}")
        if not cached_file_ok(dst, published):
            if os.path.exists(dst):
                print(f"{dst} is damaged or incomplete: downloading it again")
            download(f"{GPT2_URL_BASE}/{name_or_path}/resolve/main/{fname}", dst, name_or_path, published)
    return os.path.join(folder, "model.safetensors")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def cached_file_ok(path, published=None):
    """Is the downloaded file at path whole and unchanged: its length and sha256 those published
    (bytes, sha256), or else those recorded at download in path.sha256?"""
    try:
        if published is None:
            sha256, size = Path(path + ".sha256").read_text().split()
            published = (int(size), sha256)
        return os.path.getsize(path) == published[0] and file_sha256(path) == published[1]
    except (OSError, ValueError):
        return False  # no file, or no record of it


def download(url, dst, name, published=None):
    """Fetch url into dst atomically (atomic_write, through a temporary file of this call's own,
    so that processes downloading at once do not mix), checked before it is kept: its length
    against the server's Content-Length, and against published = (bytes, sha256) where known.
    Its length and sha256 then go to dst.sha256, which every reuse checks (cached_file_ok)."""
    print(f"downloading {url} -> {dst}")
    got = {}

    def fetch(tmp):
        digest, size = hashlib.sha256(), 0
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            announced = r.headers.get("Content-Length")
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        if announced is not None and size != int(announced):
            raise ValueError(f"the download of {url} stopped at {size} of {announced} bytes; run again")
        if published is not None and (size, digest.hexdigest()) != published:
            raise ValueError(f"the download of {url} is not the published file ({size} bytes, sha256 "
                             f"{digest.hexdigest()[:16]}... instead of {published[0]} bytes, {published[1][:16]}...); "
                             f"run again, or download it yourself and pass --init_from=PATH/model.safetensors")
        got.update(size=size, sha256=digest.hexdigest())
    try:
        atomic_write(dst, fetch)
        atomic_write(dst + ".sha256", lambda tmp: Path(tmp).write_text(f"{got['sha256']} {got['size']}\n"))
    except OSError as e:  # URLError, HTTPError, timeouts, a connection reset, a full disk
        raise RuntimeError(f"cannot download {name} ({url}: {e}); download model.safetensors yourself "
                           f"and pass --init_from=PATH/model.safetensors") from None
