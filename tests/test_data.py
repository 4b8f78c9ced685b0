"""Data: generators, metrics, schema loaders on local files, tokenization, the sampler."""

import json
import random

import pytest

from rosa_ds.config import DataConfig
from rosa_ds.data.batching import GlobalBatchSampler, collate
from rosa_ds.data.loading import load_task_data
from rosa_ds.data.metrics import final_number, number_match, sql_execution_match
from rosa_ds.data.tasks import generate
from rosa_ds.data.tokenize import IGNORE, pack, tokenize_records
from rosa_ds.errors import UserError


def test_generators_are_deterministic_and_varied():
    a, b = generate("arithmetic", 50, 7), generate("arithmetic", 50, 7)
    assert a == b and len({r["question"] for r in a}) > 40
    assert generate("arithmetic", 5, 8) != a[:5]


def test_arithmetic_answers_are_right():
    for rec in generate("arithmetic", 200, 3):
        steps = rec["answer"].split("####")[0]
        for expr in steps.replace(".", "").split(","):
            lhs, rhs = expr.replace("and", "").split("=")
            assert eval(lhs.replace("/", "//")) == int(rhs)  # noqa: S307 - generated arithmetic
        assert number_match(rec["answer"], rec["answer"])


@pytest.mark.parametrize("difficulty", [1, 4, 8])
def test_multistep_answers_chain_the_stated_operations(difficulty):
    """Each problem states ``difficulty`` operations; the answer applies them in order to the
    running total, every intermediate a whole number in 1..999, and its last value is the
    answer after ####."""
    records = generate("multistep", 300, 5, difficulty)
    assert records == generate("multistep", 300, 5, difficulty)
    assert len({r["question"] for r in records}) > 290
    for rec in records:
        work, final = rec["answer"].split("\n#### ")
        steps = work.rstrip(".").split(", ")
        assert len(steps) == difficulty == rec["question"].count("Then ")
        start = int(rec["question"].split(" has ")[1].split()[0])
        total = start
        for step in steps:
            lhs, rhs = step.split(" = ")
            a, op, b = lhs.split()
            assert int(a) == total  # each step starts from the previous result
            total = eval(lhs.replace("/", "//"))  # noqa: S307 - generated arithmetic
            assert total == int(rhs) and 1 <= total <= 999
            if op == "/":
                assert int(a) % int(b) == 0
        assert int(final) == total and number_match(rec["answer"], rec["answer"])
    ops = {step.split()[1] for rec in records for step in rec["answer"].split("\n")[0].split(", ")}
    assert ops == {"+", "-", "*", "/"}


def test_multistep_loads_as_a_task_with_its_difficulty():
    from rosa_ds.config import DataConfig
    from rosa_ds.data.loading import load_task_data

    data = load_task_data(DataConfig(dataset="multistep", num_train=50, num_eval=10, difficulty=6))
    assert data.metric == "number_match" and len(data.train) == 50 and len(data.eval) == 10
    assert all(r["reference"].count(" = ") == 6 for r in data.eval)


@pytest.mark.parametrize(
    "pred, ok",
    [
        ("so 5 + 3 = 8.\n#### 8", True),
        ("The answer is 8.", True),
        ("#### 9", False),
        ("no number", False),
        ("1,008 then 8", True),
    ],
)
def test_number_match(pred, ok):
    assert number_match(pred, "5 + 3 = 8.\n#### 8") is ok


def test_final_number_prefers_hash_marker():
    assert final_number("3 then 4 #### 12 and 5") == "12"
    assert final_number("costs 2.50 dollars") == "2.5"


def test_sql_gold_queries_execute_and_wrong_ones_fail():
    for rec in generate("sql", 60, 11):
        assert sql_execution_match(rec["answer"], rec["answer"], rec["setup"])
        assert sql_execution_match(f"```sql\n{rec['answer']};\n```", rec["answer"], rec["setup"])
        assert not sql_execution_match("", rec["answer"], rec["setup"])
        assert not sql_execution_match("```sql\n```", rec["answer"], rec["setup"])
        assert not sql_execution_match("SELECT nothing FROM nowhere", rec["answer"], rec["setup"])
    rec = next(r for r in generate("sql", 100, 11) if "COUNT(*)" in r["answer"])
    assert not sql_execution_match(
        "SELECT COUNT(*) + 1000 FROM " + rec["answer"].split("FROM ")[1],
        rec["answer"],
        rec["setup"],
    )


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_schema_loader_on_local_files(tmp_path):
    rows = [
        {"question": r["question"], "answer": r["answer"]} for r in generate("arithmetic", 30, 1)
    ]
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", rows[:25])
    _write_jsonl(folder / "test.jsonl", rows[25:])
    data = load_task_data(DataConfig(dataset=str(folder)))
    assert data.format == "gsm8k" and data.metric == "number_match"
    assert len(data.train) == 25 and len(data.eval) == 5
    assert data.train[0]["prompt"] == rows[0]["question"]


def test_sql_context_loader_parquet_and_holdout(tmp_path):
    import datasets

    rows = [{k: r[k] for k in ("question", "context", "answer")} for r in generate("sql", 40, 2)]
    path = tmp_path / "sql.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    data = load_task_data(DataConfig(dataset=str(path), eval_fraction=0.25))
    assert data.format == "sql_context" and data.metric == "sql_execution"
    assert len(data.train) == 30 and len(data.eval) == 10
    # Without inserted rows the CREATE TABLE context is the database: execution still runs.
    rec = data.eval[0]
    assert sql_execution_match(rec["reference"], rec["reference"], rec["setup"])


def test_missing_and_empty_fields_are_user_errors(tmp_path):
    path = _write_jsonl(
        tmp_path / "a.jsonl", [{"prompt": "hi", "response": "yo"}, {"prompt": "hi", "response": ""}]
    )
    with pytest.raises(UserError, match="empty field 'response'"):
        load_task_data(DataConfig(dataset=path))
    path = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "hi", "reply": "yo"}] * 3)
    with pytest.raises(UserError, match="match no known format"):
        load_task_data(DataConfig(dataset=path))
    with pytest.raises(UserError, match="does not exist"):
        load_task_data(DataConfig(dataset=str(tmp_path / "none.jsonl")))


class CharTok:
    eos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_tokenize_masks_the_prompt():
    recs = [{"prompt": "1+1?", "response": "2"}]
    (ex,) = tokenize_records(recs, CharTok(), 64, use_chat_template=True)
    n_prompt = len("### Question:\n1+1?\n### Answer:\n")
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == [ord("2"), 2]
    assert tokenize_records(recs, CharTok(), n_prompt, True) == []  # response cut off: dropped


def test_pack_and_collate():
    exs = [{"input_ids": [1] * n, "labels": [5] * n} for n in (3, 4, 5, 2)]
    packed = pack(exs, 8)  # best fit, longest first: 5 + 3 fill one sequence, 4 + 2 the next
    assert [len(p["input_ids"]) for p in packed] == [8, 6]
    assert packed[0]["position_ids"] == [0, 1, 2, 0, 1, 2, 3, 4]
    # each example's first label is the causal shift's, never predicted from the one before
    assert packed[0]["labels"] == [IGNORE, 5, 5, IGNORE, 5, 5, 5, 5]
    batch = collate(exs[:2], pad_id=0)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"][0, 3].item() == IGNORE and batch["attention_mask"][0].tolist() == [
        1,
        1,
        1,
        0,
    ]


def test_packed_examples_do_not_attend_to_each_other():
    """Four arithmetic examples packed into two sequences (one padded), through the collator
    and ``model_inputs`` as training feeds them: every example's summed token loss equals its
    loss alone. With one attention mask over the whole sequence the later examples would see
    the earlier ones, and each would predict the next one's first token."""
    import torch
    from transformers import AutoModelForCausalLM

    from rosa_ds.config import ModelConfig
    from rosa_ds.data.batching import model_inputs
    from rosa_ds.model import finish_model, load_tokenizer, resolve_model_path

    mcfg = ModelConfig(name_or_path="builtin:tiny-llama")
    path = resolve_model_path(mcfg)
    tok = load_tokenizer(path, mcfg)
    # as training loads it (no KV cache: with one, transformers ignores the packing)
    model = finish_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), mcfg)
    model.eval()
    records = load_task_data(DataConfig(dataset="arithmetic", num_train=4)).train
    exs = tokenize_records(records, tok, 160, use_chat_template=True)
    lengths = [len(e["input_ids"]) for e in exs]
    packed = pack(exs, max(lengths) * 2)
    assert len(packed) == 2 and len({len(p["input_ids"]) for p in packed}) == 2  # one padded

    def token_losses(batch):
        inputs = model_inputs(batch)
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none",
            ignore_index=IGNORE,
        )  # fmt: skip

    with torch.no_grad():
        packed_losses = token_losses(collate(packed, tok.pad_token_id))
        alone = [float(token_losses(collate([e], tok.pad_token_id)).sum()) for e in exs]
    # where each example sits in the packed sequences: pack keeps each bin in data order
    found = []
    for row, seq in enumerate(packed):
        start = 0
        for n in (len(list(g)) for g in _runs(seq["position_ids"])):
            span = packed_losses[row, start : start + n - 1]
            found.append((seq["input_ids"][start : start + n], float(span.sum())))
            start += n
    for ex, loss in zip(exs, alone, strict=True):
        (match,) = [f for ids, f in found if ids == ex["input_ids"]]
        assert match == pytest.approx(loss, rel=1e-5, abs=1e-5)


def _runs(positions):
    """The packed examples of a sequence, from where its position ids restart."""
    run = []
    for p in positions:
        if p == 0 and run:
            yield run
            run = []
        run.append(p)
    if run:
        yield run


@pytest.mark.parametrize("world", [2, 4])
def test_sampler_is_world_size_invariant(world):
    single = GlobalBatchSampler(100, 8, 2, 0, 1, seed=3)
    ranks = [GlobalBatchSampler(100, 8, 2, r, world, seed=3) for r in range(world)]
    for step in random.Random(0).sample(range(60), 15):
        ref = single.micro_batches(step)
        # micro-batch j of the global batch lives on rank j % world, in order
        for j, mb in enumerate(ref):
            assert ranks[j % world].micro_batches(step)[j // world] == mb
    epoch0 = [i for s in range(12) for mb in single.micro_batches(s) for i in mb]
    assert sorted(epoch0) == sorted(set(epoch0)) and len(epoch0) == 96


def test_generated_validation_and_test_splits_are_disjoint_from_each_other_and_train():
    from rosa_ds.config import DataConfig
    from rosa_ds.data.loading import load_task_data

    splits = {}
    for split in ("test", "validation"):
        cfg = DataConfig(dataset="multistep", num_train=300, num_eval=64, eval_split=split)
        data = load_task_data(cfg)
        splits[split] = {r["prompt"] for r in data.eval}
        train = {r["prompt"] for r in data.train}
        assert len(splits[split]) == 64 and not splits[split] & train
    assert not splits["test"] & splits["validation"]
    # the default stays the test split (what every earlier run evaluated on)
    default = load_task_data(DataConfig(dataset="multistep", num_train=300, num_eval=64))
    assert {r["prompt"] for r in default.eval} == splits["test"]


def test_generated_data_has_no_other_split():
    from rosa_ds.config import DataConfig
    from rosa_ds.data.loading import load_task_data
    from rosa_ds.errors import UserError

    with pytest.raises(UserError, match="not a split of the arithmetic generator"):
        load_task_data(DataConfig(eval_split="dev"))
