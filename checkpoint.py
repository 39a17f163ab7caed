"""
Checkpoints and the stage cache, which no method needs to read: every file the project writes
goes through atomic_write (whole or absent, never half); checkpoints are loaded with
weights_only=True and hold the stage config they were made with, so that a rerun loads what is
up to date and redoes the rest; a stage's config includes a hash of the code it runs
(code_versions). Also the one-run-per-out-dir lock, and the run's lines and times for the report.

    stage_config(cfg, stage, unit=None)   what a stage's (or one reward model's, method's) result depends on
    saved_result(path, stage_cfg, what)   a checkpoint if it is up to date, else None
    save_model, load_weights, load_checkpoint, save_atomic, atomic_write
"""
import ast
import copy
import errno
import hashlib
import os
import shutil
import time
import uuid
import zlib
from contextlib import contextmanager, suppress
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist

import parallel
from cli import STAGE_FIELDS, die
from parallel import is_main, log


class WriteError(OSError):
    """A file that could not be written (a full disk, a folder without permission): the message
    names the file and the reason."""


def atomic_write(path, write):
    """Every file the project writes goes through here: write(tmp_path) fills a temporary file
    beside path, which then replaces path in one rename, so path is always whole or absent. The
    temporary name is this call's own (two processes writing one path never share it) and is
    removed whatever happens; a failed write raises WriteError naming path."""
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
        kind = "link" if os.path.islink(path) else "folder" if os.path.isdir(path) else "special file"
        raise WriteError(f"cannot write {path}: it is a {kind}, not a file the project wrote; move it away (or "
                         f"pick another --out_dir)")
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if isinstance(e, WriteError) or not is_write_failure(e):
            raise  # not the disk's fault (a network error while downloading, a bug): as it is
        raise WriteError(f"cannot write {path}: {why_not_written(e, path)}; free some space (or pick a writable "
                         f"--out_dir)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                errno.ENOENT}


def is_write_failure(error):
    """Is this error a file that could not be written: an OSError of WRITE_ERRNOS, or torch.save's
    C++ writer failing (a RuntimeError saying so)?"""
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    return any(s in str(error) for s in ("file write failed", "PytorchStreamWriter", "unexpected pos"))


def why_not_written(error, path):
    """The reason a write failed, in words: the OS's, else (torch.save's writer says only "unexpected
    pos") a full disk found by looking, else what can stop a write part-way."""
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    try:
        if shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**20:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return "it could not be written in full (no space left on the device, or a quota or file-size limit)"


# ----------------------------------------------------------------------------------------
# Code is part of a stage's stamp: a hash of the source of every function, class and
# module-level constant of the project that the stage's function reaches by name, however
# indirectly (its closure in the call graph, read from the source with `ast`). Edit a loss
# and the stages that call it are redone, with everything downstream; the others are loaded.

# the modules whose code can change a result (report.py, cli.py and this file never do)
CODE_FILES = ("model", "gpt2", "data", "realdata", "reward", "afd", "parallel", "training", "train")
# (training.Batches: the batches of every training stage, made once in train.run_pipeline)
STAGE_CODE = {"task": ["train.stage_task"], "pretrain": ["train.stage_pretrain", "training.Batches"],
              "sft": ["train.stage_sft"],
              "sample": ["train.stage_sample"], "rm": ["train.stage_gold", "train.stage_reward_models"],
              "policy": ["train.stage_policies"], "evaluate": ["train.stage_evaluate"]}
# they print or time; no result depends on them
OUTPUT_ONLY = {"parallel.log", "parallel.progress", "training.not_finite"}
# Within a stage, each reward model and each method is stamped with its own code only (the
# others' entry points are left out), so that an edited IRFT loss retrains IRFT, not the rest.
UNIT_CODE = {"rm": {"init_sft": "afd.discriminator_batch_loss", "init_demo": "afd.discriminator_batch_loss",
                    "sft_demo": "afd.discriminator_batch_loss", "pref": "reward.pairwise_loss",
                    "ava_d": "reward.ava_d_loss", "ava_p": "reward.ava_p_loss"},
             "policy": {"afd_adversarial": "afd.afd_adversarial", "irl_iterated": "afd.irl_iterated",
                        "irft": "afd.irft", "rl_init_sft": "afd.rl_on_reward", "rl_ava_d": "afd.rl_on_reward",
                        "ava_d_direct": "afd.ava_d_direct"}}


def fingerprint(node):
    """A hash of what a piece of code does: its syntax tree without docstrings (ast drops comments and
    layout), so that editing a docstring or a comment changes no stamp."""
    node = copy.deepcopy(node)
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            n.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(node).encode()).hexdigest()[:12]


def references(*nodes):
    """The names a piece of code refers to: [(name, attribute or None)] for each `name` and each
    `name.attribute`, and the set of every attribute name it reads (`x.forward`, `self.hidden`)."""
    refs, attrs = [], set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                refs.append((n.id, None))
            elif isinstance(n, ast.Attribute):
                attrs.add(n.attr)
                if isinstance(n.value, ast.Name):
                    refs.append((n.value.id, n.attr))
    return refs, attrs


IMPLICIT = {"forward"}  # methods called without their name being read (and every __dunder__)


@lru_cache(maxsize=None)
def module_names(folder, module):
    """A module's top-level names, each with (its fingerprint, the names it refers to, the attribute
    names it reads): a function, a class without its methods (its bases, decorators, fields), each
    method as "Class.method", each name a statement assigns (of `a, b = 1, 2` each its own value).
    Also what the module's imports bind: {alias: (module, name)} (name None for `import module`)."""
    source = Path(folder, f"{module}.py").read_text()
    names, imports = {}, {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            imports.update({a.asname or a.name: (a.name, None) for a in node.names if a.name in CODE_FILES})
        elif isinstance(node, ast.ImportFrom) and node.module in CODE_FILES:
            imports.update({a.asname or a.name: (node.module, a.name) for a in node.names})
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = (fingerprint(node), *references(node))
        elif isinstance(node, ast.ClassDef):
            methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            rest = copy.copy(node)
            rest.body = [n for n in node.body if n not in methods] or [ast.Pass()]
            names[node.name] = (fingerprint(rest), *references(rest))
            names.update({f"{node.name}.{m.name}": (fingerprint(m), *references(m)) for m in methods})
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                        and len(target.elts) == len(node.value.elts)):  # a, b = 1, 2: each its own value
                    pairs = zip(target.elts, node.value.elts)
                else:
                    pairs = [(t, node) for t in ast.walk(target) if isinstance(t, ast.Name)]
                for name, value in pairs:
                    if isinstance(name, ast.Name):
                        names[name.id] = (fingerprint(value), *references(value))
    return names, imports


@lru_cache(maxsize=None)
def code_versions(roots, skip=frozenset(), folder=os.path.dirname(os.path.abspath(__file__))):
    """{"module.name": fingerprint} for roots ("module.name", ...) and every top-level name of the
    project they refer to, transitively, except the names in skip. A class counts by the methods the
    code reads by name (and forward and the dunders), each on its own: "module.Class.method"."""
    out, todo, attrs, classes = {}, list(roots), set(), set()
    while todo:
        module, name = todo.pop().split(".", 1)
        key = f"{module}.{name}"
        names, imports = module_names(folder, module)
        if key in out or key in OUTPUT_ONLY or key in skip or name not in names:
            continue
        out[key], refs, read = names[name]
        for attr in read - attrs:  # a method name read for the first time: that method of every class so far
            todo += [f"{m}.{c}.{attr}" for m, c in classes]
        attrs |= read
        if any(n.startswith(f"{name}.") for n in names) and "." not in name:  # a class: the methods reached
            classes.add((module, name))
            todo += [f"{key}.{n.split('.', 1)[1]}" for n in names if n.startswith(f"{name}.") and (
                n.split(".", 1)[1] in attrs | IMPLICIT or n.split(".", 1)[1].startswith("__"))]
        for ref, attr in refs:
            if ref in names:
                todo.append(f"{module}.{ref}")
            elif ref in imports:
                target_module, target = imports[ref]
                if target or attr:
                    todo.append(f"{target_module}.{target or attr}")
    return dict(sorted(out.items()))


def check_code_tables(methods, reward_models, folder=os.path.dirname(os.path.abspath(__file__))):
    """Stop with one line if STAGE_CODE or UNIT_CODE names code that is not there (a function renamed)
    or leaves out a method or reward model (each needs its own stamp): a stale table would stamp the
    wrong code and redo every stage, silently."""
    for table, keys in [("STAGE_CODE", [k for roots in STAGE_CODE.values() for k in roots]),
                        ("UNIT_CODE", [k for units in UNIT_CODE.values() for k in units.values()])]:
        for key in keys:
            module, name = key.split(".", 1)
            if name not in module_names(folder, module)[0]:
                die(f"checkpoint.{table} names {key}, which {module}.py does not define (renamed?): update the table "
                    f"in checkpoint.py", status=1)
    for stage, units in [("policy", [m for m in methods if m != "bon"]), ("rm", [r for r in reward_models
                                                                              if r != "logratio"])]:
        if missing := [u for u in units if u not in UNIT_CODE[stage]]:
            die(f"checkpoint.UNIT_CODE[{stage!r}] has no entry for {missing[0]}: add its entry point (the function "
                f"of afd.py or reward.py that only it runs)", status=1)


def changes(saved, current):
    """In a few words, why a saved stage config is not the current one."""
    if "code" not in saved:
        return "the code changed"
    code = [k for k in current.get("code", {}) if saved["code"].get(k) != current["code"][k]]
    code += [f"{k} (gone)" for k in saved["code"] if k not in current.get("code", {})]
    fields = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in dict.fromkeys([*current, *saved])
              if k != "code" and saved.get(k) != current.get(k)]
    said = fields + ([", ".join(code[:3]) + (f" and {len(code) - 3} more" if len(code) > 3 else "") + " changed"]
                     if code else [])
    return "; ".join(said) or "the code changed"


# ----------------------------------------------------------------------------------------
# Checkpoints: written atomically by rank 0 (atomic_write), loaded with
# weights_only=True, each holding the stage config it was made with.

def save_atomic(obj, path):
    if is_main():
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    if parallel.WORLD > 1:
        dist.barrier()


def load_checkpoint(path):
    """A checkpoint's dict, unpickled safely (tensors and plain data only, never code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything else with an UnpicklingError
        die(f"{path} is not a safe checkpoint of this project ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}); delete it, or use another --out_dir")
    if not isinstance(state, dict):
        die(f"{path} holds a {type(state).__name__}, not a checkpoint of this project; delete it, or use another --out_dir")
    return state


def stage_config(cfg, stage, unit=None):
    """The config a stage's result depends on: its fields and those of every stage before it,
    and the source of the code they run (code_versions); of one unit of the stage (a reward
    model, a method: UNIT_CODE) if given."""
    names = list(STAGE_FIELDS)
    out = {"processes": parallel.WORLD}
    for s in names[:names.index(stage) + 1]:
        out.update({k: getattr(cfg, k) for k in STAGE_FIELDS[s]})
    if cfg.demos:
        out["demos_crc32"] = file_crc32(cfg.demos)
    others = frozenset(UNIT_CODE[stage].values()) - {UNIT_CODE[stage][unit]} if unit else frozenset()
    out["code"] = code_versions(tuple(root for s in names[:names.index(stage) + 1] for root in STAGE_CODE[s]), others)
    if unit:
        out["unit"] = unit
    return out


@lru_cache(maxsize=None)
def file_crc32(path):
    """A file's CRC-32, read once per run (it stamps every stage made from the file)."""
    with open(path, "rb") as f:
        return zlib.crc32(f.read())


def saved_result(path, stage_cfg, what):
    """The checkpoint at path if it was made with stage_cfg (then the stage is skipped), else None."""
    if not os.path.exists(path):
        return None
    state = load_checkpoint(path)
    if state.get("stage_config") != stage_cfg:
        log(f"[{what}] {changes(state.get('stage_config', {}), stage_cfg)} since {path}: redoing it")
        return None
    return state


def save_model(path, model, vocab, stage_cfg, **extra):
    save_atomic({"model": model.state_dict(), "model_config": asdict(model.config),
                 "vocab": vocab.ids, "stage_config": stage_cfg, **extra}, path)


def load_weights(model, state, path, vocab):
    """Load a checkpoint into model, with a clear error if it was made for another model."""
    if state.get("model_config") != asdict(model.config) or state.get("vocab") != vocab.ids:
        die(f"{path} was made for another model config or vocabulary "
            f"({state.get('model_config')} vs {asdict(model.config)}); "
            f"delete it, or use another --out_dir")
    broken = [k for k, t in state["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        die(f"{path} holds NaN or infinite weights ({broken[0]}); delete it and run again")
    model.load_state_dict(state["model"])


def restore(model, path, stage_cfg, vocab, what):
    """Load model from path if that result is up to date; returns its saved state, or None."""
    state = saved_result(path, stage_cfg, what)
    if state is not None:
        load_weights(model, state, path, vocab)
        model.eval()
    return state


STAGE_LINES = []  # what this run did, one line per result: trained / sampled / loaded, and its end figures


def said(what, line):
    """Log a stage line ("[pi_sft] trained 400 steps ...") and keep it for report.md."""
    STAGE_LINES.append(f"{what}: {line}")
    log(f"[{what}] {line}")


STAGE_TIMES = {}  # wall time (s) of each stage ("rm") and of its parts ("rm/pref"), in the order they started


@contextmanager
def timed(name):
    """Adds the wall time of a `with timed(name):` block (or of each call of a function decorated
    with @timed(name)) to STAGE_TIMES[name]; results.json keeps them, report.md tabulates them."""
    STAGE_TIMES.setdefault(name, 0.0)
    start = time.perf_counter()
    try:
        yield
    finally:
        STAGE_TIMES[name] += time.perf_counter() - start

# ----------------------------------------------------------------------------------------
# One run per out dir

def check_out_dir(cfg):
    """--out_dir exists and is writable, and the files a run writes there are files, or stop with one line."""
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        die(f"cannot create --out_dir={cfg.out_dir!r}: {e.strerror}; pick a writable folder")
    if not os.access(cfg.out_dir, os.W_OK):
        die(f"--out_dir={cfg.out_dir!r} is not writable; pick a writable folder")
    for name in ("results.json", "report.md", "golden_vs_kl.png", "samples.pt"):  # before any work
        path = os.path.join(cfg.out_dir, name)
        if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
            die(f"{path} is a {'link' if os.path.islink(path) else 'folder or special file'}, not a file the project "
                f"wrote; move it away (or pick another --out_dir)")


@contextmanager
def out_dir_lock(out_dir):
    """One run per out dir: <out_dir>/run.lock holds the running process's id while it runs. A second
    run meets it with one line naming that process; a lock whose process is gone (a run that was
    killed) is stale and taken over; the lock is removed when the run ends, also on Ctrl-C or an error."""
    path = os.path.join(out_dir, "run.lock")
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            holder = lock_holder(path)
            if holder is not None and holder != os.getpid() and process_alive(holder):
                die(f"another run (process {holder}) is using --out_dir={out_dir}; wait for it to end or give "
                    f"another --out_dir (if no such run is going, delete {path})")
            with suppress(FileNotFoundError):
                os.remove(path)  # stale: its process is gone
        except OSError as e:
            die(f"cannot create {path}: {e.strerror}; pick a writable --out_dir")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        if lock_holder(path) == os.getpid():
            with suppress(OSError):
                os.remove(path)


def lock_holder(path):
    """The process id written in a lock file, or None if there is none or it cannot be read."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, run by another user
    return True


