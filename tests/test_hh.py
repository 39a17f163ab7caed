"""The Anthropic HH-RLHF loader: the published sample, malformed files, layout, truncation."""
import gzip
import json
from pathlib import Path

import pytest

import data
import realdata
from data import ASSISTANT, EOT, HUMAN, DataError

# The first 300 dialogues of harmless-base/test.jsonl.gz, shared beside the repository.
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
needs_fixture = pytest.mark.skipif(
    not FIXTURE.exists(), reason=f"needs the HH-RLHF sample {FIXTURE}, outside the repository (the first 300 "
                                 "dialogues of HH-RLHF harmless-base/test.jsonl.gz, in ../shared beside the project)")
EMPTY_LINE = 87  # the one fixture line whose chosen response is a lone space


def dialogue(*turns):
    """A dialogue from alternating human and assistant messages."""
    return "".join(f"{HUMAN if i % 2 == 0 else ASSISTANT} {t}" for i, t in enumerate(turns))


def pair(prompt_turns, chosen, rejected):
    """One HH-RLHF line: a shared prompt, then the two final assistant responses."""
    prompt = dialogue(*prompt_turns) + ASSISTANT
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


GOOD = [pair(["Hi"], " Hello!", " Go away."),
        pair(["What is 2 plus 2?", "4.", "And 3 plus 3?"], " 6.", " 7.")]


def write_lines(path, lines):
    """Write raw text lines (dicts become JSON), gzipped if the name ends with .gz."""
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def fixture_lines():
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------
# The published sample

@needs_fixture
def test_fixture_counts_and_summary():
    pairs, counts = realdata.read_hh_file(FIXTURE)
    assert len(fixture_lines()) == 300
    assert counts == {"read": 300, "kept": 299, "bad_line": 0, "prompt_mismatch": 0, "empty": 1}
    assert len(pairs) == counts["kept"] == counts["read"] - counts["prompt_mismatch"] - counts["empty"]
    assert realdata.hh_summary(counts) == ("hh-rlhf: 300 pairs read, 1 skipped (0 prompt mismatch, "
                                       "1 empty), 299 kept; 0 bad lines skipped")
    assert realdata.hh_summary({**counts, "truncated": 5}).endswith("; 5 prompts truncated")


@needs_fixture
def test_fixture_pairs_rebuild_the_published_dialogues():
    pairs, _ = realdata.read_hh_file(FIXTURE)
    originals = fixture_lines()
    skipped = originals.pop(EMPTY_LINE - 1)
    assert skipped["chosen"].endswith(ASSISTANT + " ")  # its chosen response is whitespace only
    assert len(pairs) == len(originals)
    for (prompt, chosen, rejected), orig in zip(pairs, originals):
        assert prompt.startswith(HUMAN) and prompt.endswith(ASSISTANT)
        assert chosen.endswith(EOT) and rejected.endswith(EOT)
        assert prompt + chosen[:-len(EOT)] == orig["chosen"]
        assert prompt + rejected[:-len(EOT)] == orig["rejected"]
        assert prompt.count(HUMAN) == orig["chosen"].count(HUMAN)  # every human turn kept
        assert prompt.count(ASSISTANT) == orig["chosen"].count(ASSISTANT)
    assert max(p.count(HUMAN) for p, _, _ in pairs) > 1  # multi-turn dialogues are there


@needs_fixture
def test_fixture_prompts_truncate_to_gpt2_token_budget():
    encode = data.gpt2_encoding().encode
    pairs, _ = realdata.read_hh_file(FIXTURE)
    truncated = 0
    for prompt, _, _ in pairs:
        short, was = realdata.truncate_prompt(prompt, encode, 64)
        truncated += was
        assert was == (short != prompt) and len(encode(short)) <= 64
        assert short.startswith(HUMAN) and short.endswith(ASSISTANT)
        assert prompt.endswith(short[len(HUMAN):])  # a tail of the prompt (the marker kept)
    assert 0 < truncated < len(pairs)


# ----------------------------------------------------------------------------------------
# One file: malformed lines, skipped pairs, unreadable files

BAD_LINES = {
    "bad JSON": ('{"chosen": "oops', "not valid JSON"),
    "not an object": ('["chosen", "rejected"]', "not a JSON object"),
    "missing key": (json.dumps({"chosen": GOOD[0]["chosen"]}), 'needs the string field "rejected"'),
    "non-string": (json.dumps({"chosen": 3, "rejected": "x"}), 'needs the string field "chosen"'),
    "no assistant turn": (json.dumps({"chosen": HUMAN + " Hi", "rejected": GOOD[0]["rejected"]}),
                          '"chosen" has no'),
    "no human turn": (json.dumps({"chosen": GOOD[0]["chosen"], "rejected": ASSISTANT + " Hi"}),
                      '"rejected" has no'),
    "end-of-text inside": (json.dumps({"chosen": GOOD[0]["chosen"],
                                       "rejected": HUMAN + f" a{EOT}b" + ASSISTANT + " c"}),
                           "\"rejected\" dialogue holds the text '<|endoftext|>', GPT-2's end-of-text token"),
}


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl"])
@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_malformed_line_names_file_and_line_or_is_skipped(tmp_path, suffix, kind):
    bad, why = BAD_LINES[kind]
    path = write_lines(tmp_path / f"train{suffix}", [GOOD[0], "", bad, GOOD[1]])  # bad is line 3
    with pytest.raises(DataError) as e:
        realdata.read_hh_file(path)
    assert str(e.value).startswith(f"{path} line 3: ") and why in str(e.value)
    assert "rerun with --skip_bad_lines" in str(e.value)
    pairs, counts = realdata.read_hh_file(path, skip_bad_lines=True)
    assert [p[0] for p in pairs] == [realdata.split_dialogue(g["chosen"])[0] for g in GOOD]
    assert counts == {"read": 2, "kept": 2, "bad_line": 1, "prompt_mismatch": 0, "empty": 0}


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl"])
def test_prompt_mismatch_and_empty_response_are_skipped_and_counted(tmp_path, suffix):
    mismatch = {"chosen": GOOD[0]["chosen"], "rejected": dialogue("Hey") + ASSISTANT + " Go away."}
    empty = pair(["Hi"], " \n ", " Hello!")
    empty_rejected = pair(["Hi"], " Hello!", "")
    path = write_lines(tmp_path / f"test{suffix}", [mismatch, GOOD[0], empty, empty_rejected, GOOD[1]])
    pairs, counts = realdata.read_hh_file(path)
    assert counts == {"read": 5, "kept": 2, "bad_line": 0, "prompt_mismatch": 1, "empty": 2}
    assert pairs == [(HUMAN + " Hi" + ASSISTANT, " Hello!" + EOT, " Go away." + EOT),
                     (dialogue("What is 2 plus 2?", "4.", "And 3 plus 3?") + ASSISTANT,
                      " 6." + EOT, " 7." + EOT)]
    assert realdata.hh_summary(counts).startswith("hh-rlhf: 5 pairs read, 3 skipped (1 prompt mismatch, 2 empty)")


def test_split_dialogue_splits_after_the_last_assistant_turn():
    text = dialogue("A", "B", "C") + ASSISTANT + " D"
    assert realdata.split_dialogue(text) == (dialogue("A", "B", "C") + ASSISTANT, " D")
    assert realdata.split_dialogue(HUMAN + " only a question") is None
    assert realdata.split_dialogue(ASSISTANT + " no human") is None


def test_unreadable_files_are_data_errors_naming_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl.gz"
    with pytest.raises(DataError, match=f"{missing}: cannot read it .*huggingface.co"):
        realdata.read_hh_file(missing)
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress(json.dumps(GOOD[0]).encode() * 50)[:60])  # truncated
    with pytest.raises(DataError, match=f"{corrupt}: not a valid gzip file"):
        realdata.read_hh_file(corrupt)
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text("just text\n")
    with pytest.raises(DataError, match=f"{not_gzip}: not a valid gzip file"):
        realdata.read_hh_file(not_gzip)
    pointer = tmp_path / "lfs.jsonl.gz"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(DataError, match=f"{pointer}: a git-lfs pointer.*git lfs pull"):
        realdata.read_hh_file(pointer)
    gz_named_plain = tmp_path / "gz.jsonl"
    gz_named_plain.write_bytes(gzip.compress(json.dumps(GOOD[0]).encode()))
    with pytest.raises(DataError, match=f"{gz_named_plain}: gzipped, but its name does not end with .gz"):
        realdata.read_hh_file(gz_named_plain)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match=f"{latin1}: not UTF-8 text;"):
        realdata.read_hh_file(latin1)
    garbage_inside = tmp_path / "garbage.jsonl.gz"  # a valid gzip stream of bytes that are not text
    garbage_inside.write_bytes(gzip.compress(bytes(range(256)) * 4))
    with pytest.raises(DataError, match=rf"{garbage_inside}: its gunzipped content is not UTF-8 text \(a corrupt file\?\)"):
        realdata.read_hh_file(garbage_inside)
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=f"{empty}: holds no lines"):
        realdata.read_hh_file(empty)


# ----------------------------------------------------------------------------------------
# The published layout

@pytest.fixture
def hh_dir(tmp_path):
    """harmless-base/train.jsonl.gz (2 pairs), helpful-base/train.jsonl (1 pair), and a
    helpful-base/test split present both gzipped (2 pairs) and plain (1 pair)."""
    (tmp_path / "harmless-base").mkdir()
    (tmp_path / "helpful-base").mkdir()
    write_lines(tmp_path / "harmless-base" / "train.jsonl.gz", GOOD)
    write_lines(tmp_path / "helpful-base" / "train.jsonl", [GOOD[1]])
    write_lines(tmp_path / "helpful-base" / "test.jsonl.gz", GOOD)
    write_lines(tmp_path / "helpful-base" / "test.jsonl", [GOOD[0]])
    return tmp_path


def test_read_hh_reads_each_subset(hh_dir):
    harmless, c1 = realdata.read_hh(hh_dir, "harmless", "train")
    helpful, c2 = realdata.read_hh(hh_dir, "helpful", "train")
    both, c3 = realdata.read_hh(hh_dir, "both", "train")
    assert (len(harmless), len(helpful)) == (2, 1) and both == harmless + helpful
    assert c3 == {k: c1[k] + c2[k] for k in c1} and c3["read"] == c3["kept"] == 3
    assert realdata.hh_files(hh_dir, "both", "train") == [hh_dir / "harmless-base" / "train.jsonl.gz",
                                                      hh_dir / "helpful-base" / "train.jsonl"]


def test_read_hh_prefers_the_gzipped_file(hh_dir):
    pairs, counts = realdata.read_hh(hh_dir, "helpful", "test")
    assert counts["kept"] == 2 and len(pairs) == 2


def test_read_hh_missing_data_says_where_to_get_it(hh_dir, tmp_path):
    with pytest.raises(DataError, match="no directory .*huggingface.co/datasets/Anthropic/hh-rlhf"):
        realdata.read_hh(tmp_path / "absent", "harmless", "train")
    with pytest.raises(DataError) as e:
        realdata.read_hh(hh_dir, "both", "test")  # harmless-base/test is missing
    msg = str(e.value)
    assert f"no {hh_dir / 'harmless-base' / 'test.jsonl.gz'}" in msg
    assert "git clone https://github.com/anthropics/hh-rlhf" in msg
    with pytest.raises(DataError, match="unknown HH-RLHF subset 'harmful'"):
        realdata.read_hh(hh_dir, "harmful", "train")
    with pytest.raises(DataError, match="split 'valid'"):
        realdata.read_hh(hh_dir, "harmless", "valid")


# ----------------------------------------------------------------------------------------
# Truncating long prompts

def words(text):
    return text.split()


THREE_TURNS = dialogue("one two three four", "five six", "seven eight nine", "ten",
                       "eleven twelve") + ASSISTANT  # 3 human turns, 18 whitespace tokens


def test_truncate_prompt_drops_whole_turns_from_the_left():
    assert len(words(THREE_TURNS)) == 18
    last_two = dialogue("seven eight nine", "ten", "eleven twelve") + ASSISTANT  # 10 tokens
    last_one = dialogue("eleven twelve") + ASSISTANT  # 4 tokens
    assert realdata.truncate_prompt(THREE_TURNS, words, 17) == (last_two, True)
    assert realdata.truncate_prompt(THREE_TURNS, words, 10) == (last_two, True)
    assert realdata.truncate_prompt(THREE_TURNS, words, 9) == (last_one, True)
    assert realdata.truncate_prompt(THREE_TURNS, words, 4) == (last_one, True)


def test_truncate_prompt_leaves_a_short_prompt_alone():
    assert realdata.truncate_prompt(THREE_TURNS, words, 18) == (THREE_TURNS, False)
    short = dialogue("Hi") + ASSISTANT
    assert realdata.truncate_prompt(short, data.gpt2_encoding().encode, 1000) == (short, False)


@pytest.mark.parametrize("max_tokens", [8, 9, 15])  # the whole last turn is 21 tokens
def test_truncate_prompt_last_resort_cuts_the_last_message_to_fit(max_tokens):
    encode = data.gpt2_encoding().encode
    message = " please summarise this very long question about many different things for me"
    prompt = dialogue("earlier", "reply") + HUMAN + message + ASSISTANT
    assert len(encode(HUMAN + message + ASSISTANT)) == 21
    short, was = realdata.truncate_prompt(prompt, encode, max_tokens)
    assert was and len(encode(short)) <= max_tokens
    assert short.startswith(HUMAN) and short.endswith(ASSISTANT) and short.count(HUMAN) == 1
    kept = short[len(HUMAN):-len(ASSISTANT)]
    assert message.endswith(kept) and len(kept) < len(message)
    longer = HUMAN + message[len(message) - len(kept) - 1:] + ASSISTANT  # one more character
    assert len(encode(longer)) > max_tokens  # as much of the message as fits is kept


def test_truncate_prompt_refuses_impossible_budgets_and_non_dialogues():
    with pytest.raises(ValueError, match="cannot hold even"):
        realdata.truncate_prompt(THREE_TURNS, words, 1)  # "Human:" and "Assistant:" need 2
    with pytest.raises(ValueError, match="cannot hold even"):
        realdata.truncate_prompt(THREE_TURNS, data.gpt2_encoding().encode, 7)  # they need 8
    with pytest.raises(ValueError, match="not a dialogue prompt"):
        realdata.truncate_prompt("no turns at all", words, 100)


# ---------------------------------------------------------------------------------------------- the task


@needs_fixture
def test_build_hh_task_splits_are_disjoint_by_prompt():
    pairs, _ = realdata.read_hh_file(FIXTURE)
    train, test = pairs[:200], pairs[200:]
    task, sizes = realdata.build_hh_task(train, test, seed=0, n_pretrain=1000, n_demo=60, n_rm=40,
                                     n_heldout=30, n_eval=1000, n_gold=50)
    distinct_train = len({p for p, _, _ in train})
    assert sizes["gold"] == 50 and sizes["demo"] == 60 and sizes["rm"] == 40 and sizes["heldout"] == 30
    assert sizes["pretrain"] == distinct_train - 150  # what is left; the data ran short of 1000
    assert sizes["eval"] == len({p for p, _, _ in test}) - 30
    splits = [{p for p, _, _ in task.gold_pairs}, {p for p, _ in task.demos}, set(task.rm_prompts),
              {p for p, _ in task.pretrain}, {row[0] for row in task.heldout}, set(task.eval_prompts)]
    assert sum(map(len, splits)) == len(set().union(*splits))  # no prompt in two splits
    chosen = {p: c for p, c, _ in train}
    assert all(chosen[p] == y for p, y in task.demos)  # demonstrations are the chosen responses
    assert len(task.pretrain) == 2 * sizes["pretrain"]  # chosen and rejected dialogues both
    again, _ = realdata.build_hh_task(train, test, seed=0, n_pretrain=1000, n_demo=60, n_rm=40,
                                  n_heldout=30, n_eval=1000, n_gold=50)
    other, _ = realdata.build_hh_task(train, test, seed=1, n_pretrain=1000, n_demo=60, n_rm=40,
                                  n_heldout=30, n_eval=1000, n_gold=50)
    assert again.demos == task.demos and other.demos != task.demos  # a function of the seed


@needs_fixture
def test_fit_to_context_shortens_everything_and_counts_it():
    pairs, _ = realdata.read_hh_file(FIXTURE)
    task, _ = realdata.build_hh_task(pairs[:200], pairs[200:], seed=0, n_pretrain=1000, n_demo=60,
                                 n_rm=40, n_heldout=30, n_eval=1000, n_gold=50)
    before = [p for p, _ in task.demos]
    counts = realdata.fit_to_context(task, block_size=96, max_new_tokens=32)
    n_tokens = lambda text: len(data.gpt2_encoding().encode(text, allowed_special={EOT}))
    assert counts["prompts_truncated"] > 0 and counts["responses_truncated"] > 0
    for p, *responses in task.pretrain + task.demos + task.pref_pairs + task.gold_pairs + task.heldout:
        assert p.startswith(HUMAN) and p.endswith(ASSISTANT) and n_tokens(p) <= 96 - 32
        assert all(n_tokens(p) + n_tokens(y) <= 96 for y in responses)
    for p, y in zip(task.eval_prompts, task.eval_demos):
        assert n_tokens(p) <= 64 and n_tokens(p) + n_tokens(y) <= 96
    # a shortened prompt is the end of the original one; nothing was dropped
    assert len(task.demos) == len(before)
    assert all(old.endswith(new[len(HUMAN):]) for old, (new, _) in zip(before, task.demos))
    assert sum(old != new for old, (new, _) in zip(before, task.demos)) <= counts["prompts_truncated"]
