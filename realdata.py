"""
Readers of real data: HH-RLHF dialogues and JSON-lines demonstration files, each turned into
data.py's dialogue format ("\n\nHuman: ...\n\nAssistant:" prompts, responses ending with
end-of-text), with one clear data.DataError naming the file and line for anything malformed.

API
    read_demos(path)               -> (rows, line_numbers): (prompt, response) demonstrations from a
                                      JSON-lines file of {"prompt", "response"} objects (.gz or plain)
    read_hh(data_dir, subset, split, skip_bad_lines=False)
                                   -> (pairs, counts): Anthropic HH-RLHF as published (harmless-base/,
                                      helpful-base/) as (prompt, chosen, rejected) triples, what was
                                      skipped counted; read_hh_file(path) reads one file, hh_files
                                      names them, hh_summary(counts) says it in one line
    split_dialogue(text)           -> (prompt, response), split after the last "\n\nAssistant:"
    truncate_prompt(prompt, encode, max_tokens)  -> (prompt, was_truncated), whole turns dropped
    build_hh_task(train_pairs, test_pairs, seed, n_...)  -> (data.Task, sizes), disjoint prompt splits
    read_hh_task(data_dir, subset, skip_bad_lines, seed, n_...)  -> (data.Task, notes for the log)
    fit_to_context(task, block_size, max_new_tokens)  -> counts; every dialogue shortened to fit
"""
import gzip
import json
import random
import re
import zlib
from pathlib import Path

from data import ASSISTANT, EOT, HUMAN, DataError, Task, gpt2_encoding

# ----------------------------------------------------------------------------------------
# Demonstrations from a file

def inner_eot(**texts):
    """What is wrong if a text holds the literal "<|endoftext|>" anywhere but at its very end (a
    response may end with it): GPT-2 reads it as its end-of-text token, which would cut the text
    there. "" if none does."""
    for name, text in texts.items():
        if EOT in text.removesuffix(EOT):
            return (f"the {name} holds the text {EOT!r}, GPT-2's end-of-text token, which would end the "
                    f"text there; remove it (only the very end of a response may have it)")
    return ""


def read_demos(path):
    """Demonstrations from a JSON-lines file (gzipped if its name ends with .gz), one
    {"prompt": ..., "response": ...} a line.

    The prompt is a dialogue in the HH-RLHF format ending with "\n\nAssistant:"; the
    response is the text that follows it (end-of-text is appended if missing). Blank lines
    are skipped. Returns (rows, line_numbers) with rows a list of (prompt, response).
    """
    fix = 'each line must be one JSON object {"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "response": " ..."}'
    rows, lines = [], []
    try:
        with _open_text(path) as f:
            for k, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {k}: not valid JSON ({e.msg}); {fix}") from None
                if not (isinstance(obj, dict) and isinstance(obj.get("prompt"), str)
                        and isinstance(obj.get("response"), str)):
                    raise DataError(f'{path} line {k}: needs the string fields "prompt" and "response"; {fix}')
                prompt, response = obj["prompt"], obj["response"]
                if not prompt.endswith(ASSISTANT) or HUMAN not in prompt:
                    raise DataError(f"{path} line {k}: the prompt must be a dialogue ending with "
                                    f"{ASSISTANT!r} (the HH-RLHF format); {fix}")
                if (where := inner_eot(prompt=prompt, response=response)):
                    raise DataError(f"{path} line {k}: {where}")
                if not response.replace(EOT, "").strip():
                    raise DataError(f"{path} line {k}: the response is empty")
                rows.append((prompt, response if response.endswith(EOT) else response + EOT))
                lines.append(k)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}); give the path of a JSON-lines file") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: {not_text(path)}; give a JSON-lines file") from None
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise DataError(f"{path}: not a valid gzip file (a corrupt or truncated file?)") from None
    if not rows:
        raise DataError(f"{path}: holds no demonstrations (an empty file?); {fix}")
    return rows, lines


# ----------------------------------------------------------------------------------------
# Real data: Anthropic HH-RLHF

HH_SUBSETS = {"harmless": ["harmless-base"], "helpful": ["helpful-base"],
              "both": ["harmless-base", "helpful-base"]}
HH_SPLITS = ("train", "test")
HH_SOURCE = ("get it from https://huggingface.co/datasets/Anthropic/hh-rlhf or with "
             "`git clone https://github.com/anthropics/hh-rlhf` (its files are in git-lfs: "
             "run `git lfs pull` in the clone)")
HH_FIX = ('each line must be one JSON object {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", '
          '"rejected": "..."}; fix the line, or rerun with --skip_bad_lines to skip such lines')
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def split_dialogue(text):
    """(prompt, response) of a dialogue, split right after its last "\n\nAssistant:".

    The prompt keeps every earlier turn; the response is the rest, as is (leading space
    included). None if the text has no "\n\nAssistant:" after a "\n\nHuman:".
    """
    i = text.rfind(ASSISTANT)
    if i < 0 or HUMAN not in text[:i]:
        return None
    i += len(ASSISTANT)
    return text[:i], text[i:]


def _hh_line(line):
    """The (prompt, response) splits of one line's "chosen" and "rejected": (splits, None),
    or (None, what is wrong) if the line is malformed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    splits = []
    for key in ("chosen", "rejected"):
        if not isinstance(obj.get(key), str):
            return None, f'needs the string field "{key}"'
        if (problem := inner_eot(**{f'"{key}" dialogue': obj[key]})):
            return None, problem
        split = split_dialogue(obj[key])
        if split is None:
            return None, f'"{key}" has no {ASSISTANT!r} turn after a {HUMAN!r} turn'
        splits.append(split)
    return splits, None


def _hh_pair(splits):
    """(prompt, chosen, rejected) with end-of-text appended, or (None, why it is skipped)."""
    (prompt, chosen), (other, rejected) = splits
    if prompt != other:
        return None, "prompt_mismatch"
    if not chosen.replace(EOT, "").strip() or not rejected.replace(EOT, "").strip():
        return None, "empty"
    ends = [r if r.endswith(EOT) else r + EOT for r in (chosen, rejected)]
    return (prompt, *ends), None


def _open_text(path):
    """A text file object: gunzipped if the name ends with .gz, read as is otherwise."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _is_lfs_pointer(path):
    """Is the file a git-lfs pointer (a clone without git-lfs) rather than the data?"""
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER)) == LFS_POINTER
    except OSError:
        return False


def not_text(path):
    """Why a file that should hold UTF-8 JSON lines does not, in words."""
    if str(path).endswith(".gz"):
        return "its gunzipped content is not UTF-8 text (a corrupt file?)"
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            return "gzipped, but its name does not end with .gz: name it .jsonl.gz"
    return "not UTF-8 text"


def read_hh_file(path, skip_bad_lines=False):
    """Preference pairs from one HH-RLHF file: .jsonl.gz (gzip) or .jsonl (plain) by name.

    Each line is {"chosen": dialogue, "rejected": dialogue}; both are split after their last
    "\n\nAssistant:" (split_dialogue). Returns (pairs, counts): pairs is a list of
    (prompt, chosen_response, rejected_response), responses as published with end-of-text
    appended. A malformed line raises a DataError naming the file and line, or with
    skip_bad_lines is skipped and counted. Pairs whose two prompts differ, or with a
    whitespace-only response, are always skipped and counted. counts: "read" (well-formed
    pairs read), "kept" (len(pairs)), "bad_line", "prompt_mismatch", "empty".
    """
    counts = {"read": 0, "kept": 0, "bad_line": 0, "prompt_mismatch": 0, "empty": 0}
    pairs = []
    try:
        with _open_text(path) as f:
            for k, line in enumerate(f, 1):
                if not line.strip():
                    continue
                splits, problem = _hh_line(line)
                if problem and not skip_bad_lines:
                    raise DataError(f"{path} line {k}: {problem}; {HH_FIX}")
                if problem:
                    counts["bad_line"] += 1
                    continue
                counts["read"] += 1
                pair, skipped = _hh_pair(splits)
                if skipped:
                    counts[skipped] += 1
                else:
                    pairs.append(pair)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}); {HH_SOURCE}") from None
    except (gzip.BadGzipFile, EOFError, zlib.error):
        why = ("a git-lfs pointer, not the data" if _is_lfs_pointer(path)
               else "not a valid gzip file (a corrupt or truncated download?)")
        raise DataError(f"{path}: {why}; {HH_SOURCE}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: {not_text(path)}; {HH_SOURCE}") from None
    if counts["read"] + counts["bad_line"] == 0:
        raise DataError(f"{path}: holds no lines (an empty file?); {HH_SOURCE}")
    counts["kept"] = len(pairs)
    return pairs, counts


def hh_files(data_dir, subset="harmless", split="train"):
    """The files read_hh reads: <data_dir>/<subset>-base/<split>.jsonl.gz, or the plain
    <split>.jsonl where only that exists (the .gz is preferred: it is the published file)."""
    if subset not in HH_SUBSETS or split not in HH_SPLITS:
        raise DataError(f"unknown HH-RLHF subset {subset!r} or split {split!r}: subset is one "
                        f"of {list(HH_SUBSETS)}, split one of {list(HH_SPLITS)}")
    wanted = [Path(data_dir) / d / f"{split}.jsonl.gz" for d in HH_SUBSETS[subset]]
    found = [gz if gz.exists() else gz.with_suffix("") for gz in wanted]  # .jsonl.gz, else .jsonl
    missing = [str(w) for w, f in zip(wanted, found) if not f.is_file()]
    if missing:
        where = (f"no directory {data_dir}" if not Path(data_dir).is_dir()
                 else f"no {' or '.join(missing)}")
        raise DataError(f"HH-RLHF data not found ({where}); looked for "
                        f"{', '.join(map(str, wanted))} (or the same without .gz); {HH_SOURCE}")
    return found


def read_hh(data_dir, subset="harmless", split="train", skip_bad_lines=False):
    """Preference pairs of an HH-RLHF subset ("harmless", "helpful" or "both") and split
    ("train" or "test") from the published layout; returns (pairs, counts) summed over files."""
    pairs, counts = [], {}
    for path in hh_files(data_dir, subset, split):
        file_pairs, file_counts = read_hh_file(path, skip_bad_lines)
        pairs += file_pairs
        counts = {k: counts.get(k, 0) + v for k, v in file_counts.items()}
    return pairs, counts


def hh_summary(counts):
    """One line saying what read_hh read and skipped (and truncated, if counts has it)."""
    skipped = counts["prompt_mismatch"] + counts["empty"]
    line = (f"hh-rlhf: {counts['read']} pairs read, {skipped} skipped "
            f"({counts['prompt_mismatch']} prompt mismatch, {counts['empty']} empty), "
            f"{counts['kept']} kept; {counts['bad_line']} bad lines skipped")
    if "truncated" in counts:
        line += f"; {counts['truncated']} prompts truncated"
    return line


def truncate_prompt(prompt, encode, max_tokens):
    """(prompt, was_truncated): the prompt cut to at most max_tokens tokens of `encode`.

    Whole turns are dropped from the left, so what remains starts with "\n\nHuman:" and
    ends with "\n\nAssistant:". If even the last human turn does not fit (last resort), the
    start of its message is cut (by characters, bisected so that it fits whatever `encode`
    is) and "\n\nHuman:" is kept in front. Raises ValueError if not even
    "\n\nHuman:\n\nAssistant:" fits, or if the prompt is not a dialogue.
    """
    if not prompt.endswith(ASSISTANT) or HUMAN not in prompt:
        raise ValueError(f"not a dialogue prompt ending in {ASSISTANT!r}: {prompt[-60:]!r}")
    if len(encode(prompt)) <= max_tokens:
        return prompt, False
    for m in re.finditer(re.escape(HUMAN), prompt):  # longest suffix first
        if len(encode(prompt[m.start():])) <= max_tokens:
            return prompt[m.start():], True
    return _cut_last_turn(prompt, encode, max_tokens), True


def _cut_last_turn(prompt, encode, max_tokens):
    """HUMAN + the longest tail of the last human message + ASSISTANT that fits max_tokens."""
    message = prompt[prompt.rfind(HUMAN) + len(HUMAN):-len(ASSISTANT)]
    def cut(i):
        return HUMAN + message[i:] + ASSISTANT
    if len(encode(cut(len(message)))) > max_tokens:
        raise ValueError(f"max_tokens={max_tokens} cannot hold even {cut(len(message))!r}")
    lo, hi = 0, len(message)  # cut(lo) is too long, cut(hi) fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(encode(cut(mid))) <= max_tokens else (mid, hi)
    return cut(hi)


def build_hh_task(train_pairs, test_pairs, seed, n_pretrain, n_demo, n_rm, n_heldout, n_eval, n_gold):
    """A Task from HH-RLHF (prompt, chosen, rejected) pairs, with disjoint prompt splits.

    From the train pairs, shuffled by the seed, one pair per distinct prompt, in this order:
    gold (the gold reward model's pairs), demo (the chosen response is the demonstration), rm
    (preference pairs of `pref` and prompts for sampling), pretrain (chosen and rejected
    dialogues both: a corpus of mixed quality). From the test pairs: held-out (the chosen
    response stands in for the demonstration) and eval. A split gets what is left when the
    data run short; returns (task, sizes) so that the caller can say so.
    """
    def distinct(pairs, tag):
        rows = list({p: (p, c, r) for p, c, r in pairs}.values())
        random.Random(f"{seed}/hh/{tag}").shuffle(rows)
        return rows
    train, test = distinct(train_pairs, "train"), distinct(test_pairs, "test")
    take = lambda rows, n: (rows[:n], rows[n:])
    gold, train = take(train, n_gold)
    demo, train = take(train, n_demo)
    rm, train = take(train, n_rm)
    pretrain, _ = take(train, n_pretrain)
    heldout, test = take(test, n_heldout)
    evaluate, _ = take(test, n_eval)
    task = Task(pretrain=[(p, y) for p, c, r in pretrain for y in (c, r)],
                demos=[(p, c) for p, c, _ in demo], rm_prompts=[p for p, _, _ in rm], pref_pairs=rm,
                heldout=[(p, c, c, r) for p, c, r in heldout], eval_prompts=[p for p, _, _ in evaluate],
                eval_demos=[c for _, c, _ in evaluate], gold_pairs=gold)
    sizes = {"gold": len(gold), "demo": len(demo), "rm": len(rm), "pretrain": len(pretrain),
             "heldout": len(heldout), "eval": len(evaluate)}
    return task, sizes


def read_hh_task(data_dir, subset, skip_bad_lines, seed, n_pretrain, n_demo, n_rm, n_heldout, n_eval, n_gold):
    """build_hh_task on the train and test files of data_dir (read_hh). Returns (task, notes):
    notes are lines for the log (what was read and skipped, splits that ran short). A split
    left empty is a DataError."""
    pairs, notes = {}, []
    for split in ("train", "test"):
        pairs[split], counts = read_hh(data_dir, subset, split, skip_bad_lines)
        notes.append(f"{split}: " + hh_summary(counts))
    task, sizes = build_hh_task(pairs["train"], pairs["test"], seed, n_pretrain, n_demo, n_rm, n_heldout,
                                n_eval, n_gold)
    asked = {"gold": n_gold, "demo": n_demo, "rm": n_rm, "heldout": n_heldout, "eval": n_eval}
    short = [f"{k} {sizes[k]} of {n}" for k, n in asked.items() if sizes[k] < n]
    if short:
        notes.append(f"the data ran short, these splits are smaller than asked: {', '.join(short)}")
    empty = [k for k in asked if sizes[k] == 0]
    if empty:  # the splits are taken in order: train gold, demo, rm; test heldout, eval
        first = {"gold": [], "demo": ["n_gold"], "rm": ["n_gold", "n_demo"], "heldout": [], "eval": ["n_heldout"]}
        lower = sorted({option for k in empty for option in first[k]})
        raise DataError(f"--data_dir={data_dir}: not enough distinct prompts for the {', '.join(empty)} "
                        f"split(s) ({sizes}); " + (f"lower --{'/--'.join(lower)} or " if lower else "")
                        + "give more data")
    return task, notes


def fit_to_context(task, block_size, max_new_tokens):
    """Shorten every dialogue of a real-data task to the model's context, in place; returns
    counts. A prompt keeps at most block_size - max_new_tokens tokens, dropping whole turns
    from the left (truncate_prompt); a response keeps what fits after its prompt, cut from
    the right (it then has no end-of-text). Nothing is dropped, everything is counted."""
    encode = lambda text: gpt2_encoding().encode(text, allowed_special={EOT})
    counts = {"prompts_truncated": 0, "responses_truncated": 0}
    memo = {}

    def prompt_fit(prompt):
        if prompt not in memo:
            try:
                memo[prompt] = truncate_prompt(prompt, encode, block_size - max_new_tokens)
            except ValueError:  # not even an empty turn fits
                raise DataError(f"--block_size={block_size} less --max_new_tokens={max_new_tokens} leaves "
                                f"{block_size - max_new_tokens} tokens for a prompt, too few for even one short "
                                f"turn; raise --block_size or lower --max_new_tokens") from None
            counts["prompts_truncated"] += memo[prompt][1]
        return memo[prompt][0]

    def response_fit(prompt, response):
        budget = block_size - len(encode(prompt))
        ids = encode(response)
        if len(ids) <= budget:
            return response
        counts["responses_truncated"] += 1
        keep = budget
        while len(encode(gpt2_encoding().decode(ids[:keep]))) > budget:  # re-encoding a cut
            keep -= 1                                                     # text can change it
        return gpt2_encoding().decode(ids[:keep])

    def fit(prompt, *responses):
        prompt = prompt_fit(prompt)
        return (prompt, *(response_fit(prompt, y) for y in responses))

    for name in ("pretrain", "demos", "pref_pairs", "gold_pairs", "heldout"):
        setattr(task, name, [fit(*row) for row in getattr(task, name)])
    task.eval_demos = [fit(p, y)[1] for p, y in zip(task.eval_prompts, task.eval_demos)]
    task.rm_prompts = [prompt_fit(p) for p in task.rm_prompts]
    task.eval_prompts = [prompt_fit(p) for p in task.eval_prompts]
    return counts
