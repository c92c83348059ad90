"""Loading GLUE folders, explicit data files and the hub into TaskData; every bad-data path is a typed error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffcli.errors import DataError, HubUnavailableError, InvalidValueError, NotFoundError
from diffcli.data_sources import load_task
from diffcli.tasks import GLUE_TASKS, Example, task_spec
from tests.conftest import GLUE_DIR

MNLI_TRAIN_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                   "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
MNLI_DEV_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                 "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def mnli_row(i, s1, s2, label, dev=False):
    extra = [label] * (5 if dev else 1)
    return "\t".join([str(i), "p", "q", "fiction", "(", ")", "(", ")", s1, s2, *extra, label])


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture
def glue(tmp_path: Path) -> Path:
    """Tiny files for every GLUE task in the original layout and with each task's quirks."""
    root = tmp_path / "glue"
    # CoLA: no header, 4 columns, dev without a trailing newline.
    write(root / "CoLA/train.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n\ncl_1\t1\t\tA dog ran.\n")
    write(root / "CoLA/dev.tsv", "gj04\t0\t*\tRan dog a.\ngj04\t1\t\tThe dog ran.")
    write(root / "SST-2/train.tsv", "sentence\tlabel\ngood movie \t1\nbad movie \t0\n")
    write(root / "SST-2/dev.tsv", "sentence\tlabel\nnot good\t0\n")
    head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(root / "MRPC/train.tsv", head + '1\t1\t2\tHe said " yes " .\tHe agreed .\n0\t3\t4\tA b .\tC d .\n')
    write(root / "MRPC/dev.tsv", head + "1\t5\t6\tX .\tY .\n")
    sts = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    write(root / "STS-B/train.tsv", sts + "0\tg\tf\t2012\t1\tnone\tnone\tA plane.\tAn air plane.\t5.000\n"
                                          "1\tg\tf\t2012\t2\tnone\tnone\tA man.\tA flute.\t0.750\n")
    write(root / "STS-B/dev.tsv", sts + "0\tg\tf\t2012\t1\tnone\tnone\tA b.\tA c.\t3.2\n")
    qqp = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    write(root / "QQP/train.tsv", qqp + "0\t1\t2\tWhy?\tWhy not?\t0\n1\t3\t4\tHow?\tIn what way?\t1\n")
    write(root / "QQP/dev.tsv", qqp + "0\t1\t2\tWho?\tWhom?\t1\n")
    write(root / "MNLI/train.tsv", MNLI_TRAIN_HEAD + "\n" + "\n".join([
        mnli_row(0, "A man eats.", "A man is eating.", "entailment"),
        mnli_row(1, "A man eats.", "Nobody eats.", "contradiction"),
        mnli_row(2, "A man eats.", "He is hungry.", "neutral")]) + "\n")
    write(root / "MNLI/dev_matched.tsv", MNLI_DEV_HEAD + "\n" + mnli_row(0, "a", "b", "neutral", dev=True) + "\n")
    write(root / "MNLI/dev_mismatched.tsv", MNLI_DEV_HEAD + "\n" + mnli_row(0, "c", "d", "contradiction", dev=True) + "\n")
    qnli = "index\tquestion\tsentence\tlabel\n"
    write(root / "QNLI/train.tsv", qnli + '0\tWhat is it?\t"It is a cat.\tentailment\n'
                                          '1\tWho?\tNo one "said" so.\tnot_entailment\n')
    write(root / "QNLI/dev.tsv", qnli + '0\t"Why?\tBecause.\tentailment\n')
    pair = "index\tsentence1\tsentence2\tlabel\n"
    write(root / "RTE/train.tsv", pair + "0\tA.\tB.\tnot_entailment\n1\tC.\tD.\tentailment\n")
    write(root / "RTE/dev.tsv", pair + "0\tE.\tF.\tentailment\n")
    write(root / "WNLI/train.tsv", pair + "0\tA.\tB.\t1\n1\tC.\tD.\t0\n")
    write(root / "WNLI/dev.tsv", pair + "0\tE.\tF.\t0\n")
    return root


# --------------------------------------------------------------------------------------------- GLUE folder

def test_cola_headerless_without_trailing_newline(glue):
    data = load_task("cola", data_dir=glue)
    assert data.spec is GLUE_TASKS["cola"]
    assert data.train == [Example(("The cat sat.",), 1), Example(("Cat the sat.",), 0), Example(("A dog ran.",), 1)]
    assert data.eval == {"validation": [Example(("Ran dog a.",), 0), Example(("The dog ran.",), 1)]}


def test_mrpc_bom_header_and_quotes_kept(glue):
    data = load_task("mrpc", data_dir=glue)
    assert data.train[0] == Example(('He said " yes " .', "He agreed ."), 1)
    assert data.train[1].label == 0
    assert data.eval["validation"] == [Example(("X .", "Y ."), 1)]


def test_stsb_is_regression_with_float_scores(glue):
    data = load_task("stsb", data_dir=glue)
    assert data.spec.is_regression and data.spec.num_labels == 1
    assert [e.label for e in data.train] == [5.0, 0.75]
    assert all(isinstance(e.label, float) for e in data.train)
    assert data.eval["validation"][0] == Example(("A b.", "A c."), 3.2)


def test_mnli_label_order_last_column_and_two_dev_files(glue):
    data = load_task("mnli", data_dir=glue)
    assert data.spec.labels == ("entailment", "neutral", "contradiction")
    assert [e.label for e in data.train] == [0, 2, 1]
    assert data.train[1].texts == ("A man eats.", "Nobody eats.")
    assert data.eval == {"validation_matched": [Example(("a", "b"), 1)],
                         "validation_mismatched": [Example(("c", "d"), 2)]}


def test_qnli_stray_quote_is_not_quoting(glue):
    data = load_task("qnli", data_dir=glue)
    assert data.train == [Example(("What is it?", '"It is a cat.'), 0),
                          Example(("Who?", 'No one "said" so.'), 1)]
    assert data.eval["validation"] == [Example(('"Why?', "Because."), 0)]


@pytest.mark.parametrize("task,train,dev", [
    ("sst2", [(("good movie ",), 1), (("bad movie ",), 0)], [(("not good",), 0)]),
    ("qqp", [(("Why?", "Why not?"), 0), (("How?", "In what way?"), 1)], [(("Who?", "Whom?"), 1)]),
    ("rte", [(("A.", "B."), 1), (("C.", "D."), 0)], [(("E.", "F."), 0)]),
    ("wnli", [(("A.", "B."), 1), (("C.", "D."), 0)], [(("E.", "F."), 0)]),
])
def test_other_tasks(glue, task, train, dev):
    data = load_task(task, data_dir=glue)
    assert data.train == [Example(*e) for e in train]
    assert data.eval == {"validation": [Example(*e) for e in dev]}


def test_task_dir_case_insensitive_and_task_name_aliases(glue):
    (glue / "SST-2").rename(glue / "sst2")
    assert len(load_task("SST-2", data_dir=glue).train) == 2
    assert load_task("sts_b", data_dir=glue).spec.name == "stsb"


def test_data_dir_may_be_the_task_folder_itself(glue):
    assert len(load_task("rte", data_dir=glue / "RTE").train) == 2


def test_glue_dir_environment_variable(glue, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(glue))
    assert len(load_task("wnli").train) == 2


def test_max_samples_take_the_first_rows_and_need_train(glue):
    data = load_task("mnli", data_dir=glue, max_train_samples=2, max_eval_samples=1)
    assert [e.label for e in data.train] == [0, 2]
    only_eval = load_task("cola", data_dir=glue, need_train=False, max_eval_samples=1)
    assert only_eval.train is None and only_eval.eval["validation"] == [Example(("Ran dog a.",), 0)]


def test_missing_task_folder_and_missing_dev_file(glue, tmp_path):
    with pytest.raises(NotFoundError, match="no QQP folder"):
        load_task("qqp", data_dir=glue / "CoLA")
    (glue / "RTE/dev.tsv").unlink()
    with pytest.raises(NotFoundError, match="dev.tsv"):
        load_task("rte", data_dir=glue)
    with pytest.raises(NotFoundError, match="not found"):
        load_task("rte", data_dir=tmp_path / "nowhere")


def test_wrong_column_count_names_file_and_line(glue):
    write(glue / "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n1\tA\tB\tC\tentailment\n")
    with pytest.raises(DataError, match=r"RTE/train.tsv:3: expected 4 .* found 5"):
        load_task("rte", data_dir=glue)


def test_unknown_label_names_file_line_and_allowed_set(glue):
    write(glue / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n1\tC.\tD.\tmaybe\n")
    with pytest.raises(DataError, match=r"RTE/dev.tsv:3: unknown label 'maybe'.*entailment, not_entailment"):
        load_task("rte", data_dir=glue)


def test_non_numeric_regression_label(glue):
    sts = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    write(glue / "STS-B/dev.tsv", sts + "0\tg\tf\t2012\t1\tnone\tnone\tA b.\tA c.\thigh\n")
    with pytest.raises(DataError, match=r"STS-B/dev.tsv:2: label 'high' is not a number"):
        load_task("stsb", data_dir=glue)


def test_empty_and_header_only_files(glue):
    write(glue / "SST-2/train.tsv", "")
    with pytest.raises(DataError, match="file is empty"):
        load_task("sst2", data_dir=glue)
    write(glue / "SST-2/train.tsv", "sentence\tlabel\n\n")
    with pytest.raises(DataError, match="no data rows"):
        load_task("sst2", data_dir=glue)


def test_missing_column_is_named_with_the_columns_present(glue):
    write(glue / "QQP/train.tsv", "id\tqid1\tqid2\tq1\tq2\tis_duplicate\n0\t1\t2\ta\tb\t0\n")
    with pytest.raises(DataError, match=r"missing columns 'question1', 'question2'; columns are: id, qid1, qid2, q1"):
        load_task("qqp", data_dir=glue)


def test_unknown_task_and_no_source():
    with pytest.raises(InvalidValueError, match="unknown task 'glue9'"):
        task_spec("glue9")
    with pytest.raises(InvalidValueError, match="no data"):
        load_task(None)
    with pytest.raises(InvalidValueError, match="at least 1"):
        load_task("rte", max_train_samples=0)


def test_hub_failure_becomes_hub_unavailable(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    # mrpc: rte would fall back to the bundled example set (tests/test_example_data.py)
    with pytest.raises(HubUnavailableError, match="cannot load GLUE task mrpc") as info:
        load_task("mrpc")
    assert "--data-dir" in info.value.hint


def test_hub_dataset_rows_become_examples(monkeypatch):
    datasets = pytest.importorskip("datasets")
    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"premise": ["a", "b", "c"], "hypothesis": ["x", "y", "z"],
                                             "label": [2, 0, 1], "idx": [0, 1, 2]}),
        "validation_matched": datasets.Dataset.from_dict({"premise": ["m"], "hypothesis": ["n"], "label": [1], "idx": [0]}),
        "validation_mismatched": datasets.Dataset.from_dict({"premise": ["o"], "hypothesis": ["p"], "label": [0], "idx": [0]}),
    })
    calls = []
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or fake)
    data = load_task("mnli", max_train_samples=2)
    assert calls == [("nyu-mll/glue", "mnli")]
    assert data.train == [Example(("a", "x"), 2), Example(("b", "y"), 0)]
    assert data.eval == {"validation_matched": [Example(("m", "n"), 1)],
                         "validation_mismatched": [Example(("o", "p"), 0)]}


# --------------------------------------------------------------------------------------------- explicit files

def test_csv_for_a_glue_task_accepts_label_names_and_ids(tmp_path):
    train = write(tmp_path / "train.csv", 'sentence1,sentence2,label\n"A, b",C,entailment\nD,"E ""q""",1\n')
    dev = write(tmp_path / "dev.csv", "sentence1,sentence2,label\nF,G,not_entailment\n")
    data = load_task("rte", train_file=train, validation_file=dev)
    assert data.spec.name == "rte"
    assert data.train == [Example(("A, b", "C"), 0), Example(("D", 'E "q"'), 1)]
    assert data.eval == {"validation": [Example(("F", "G"), 1)]}


def test_jsonl_and_json_custom_string_labels_sorted(tmp_path):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "meh", "label": "mid"}]
    train = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    dev = write(tmp_path / "dev.json", json.dumps([{"text": "ok", "label": "mid"}]))
    data = load_task(train_file=train, validation_file=dev)
    assert data.spec.name == "custom" and data.spec.text_fields == ("text",)
    assert data.spec.labels == ("mid", "neg", "pos") and data.spec.metrics == ("accuracy",)
    assert [e.label for e in data.train] == [2, 1, 0]
    assert data.eval["validation"] == [Example(("ok",), 0)]


def test_json_data_key_and_json_lines_in_a_json_file(tmp_path):
    a = write(tmp_path / "a.json", json.dumps({"data": [{"sentence": "x", "label": 1}, {"sentence": "y", "label": 0}]}))
    b = write(tmp_path / "b.json", '{"sentence": "z", "label": 1}\n{"sentence": "w", "label": 0}\n')
    for path in (a, b):
        data = load_task("sst2", train_file=path, validation_file=path)
        assert [e.label for e in data.train] == [1, 0]


def test_custom_integer_labels_sorted_numerically(tmp_path):
    train = write(tmp_path / "t.tsv", "sentence\tlabel\na\t10\nb\t2\nc\t2.0\n")
    data = load_task(train_file=train)
    assert data.spec.labels == ("2", "10")
    assert [e.label for e in data.train] == [1, 0, 0]
    assert data.eval == {}


def test_custom_float_labels_are_regression(tmp_path):
    train = write(tmp_path / "t.csv", "premise,hypothesis,score\na,b,0.5\nc,d,4\n")
    data = load_task(train_file=train, label_field="score")
    assert data.spec.is_regression and data.spec.text_fields == ("premise", "hypothesis")
    assert data.spec.metrics == ("pearson", "spearmanr") and data.spec.main_metric == "combined_score"
    assert [e.label for e in data.train] == [0.5, 4.0]


def test_files_and_a_glue_folder_together_are_refused(tmp_path):
    train = write(tmp_path / "t.csv", "sentence,label\na,1\n")
    with pytest.raises(InvalidValueError, match="and --train-file/--validation-file read your files: give one or"):
        load_task("sst2", data_dir=tmp_path, train_file=train)
    with pytest.raises(InvalidValueError, match="folder and --validation-file reads your files: give one or"):
        load_task(validation_file=train, data_dir=tmp_path, need_train=False)  # eval, which has no --train-file
    with pytest.raises(InvalidValueError, match="apply only to --validation-file$"):
        load_task("rte", label_field="x", need_train=False)


def test_custom_explicit_labels_and_eval_only(tmp_path):
    dev = write(tmp_path / "d.csv", "text,label\na,yes\n")
    data = load_task(validation_file=dev, need_train=False, labels=["no", "yes"])
    assert data.train is None and data.spec.labels == ("no", "yes")
    assert data.eval["validation"] == [Example(("a",), 1)]


def test_text_and_label_field_overrides(tmp_path):
    train = write(tmp_path / "t.csv", "q,a,y,other\nwhy,because,1,z\n")
    data = load_task("qnli", train_file=train, text_fields=["q", "a"], label_field="y")
    assert data.spec.text_fields == ("q", "a") and data.spec.label_field == "y"
    assert data.train == [Example(("why", "because"), 1)]


def test_original_glue_tsv_as_explicit_files(glue):
    data = load_task("mrpc", train_file=glue / "MRPC/train.tsv", validation_file=glue / "MRPC/dev.tsv")
    assert data.train[0] == Example(('He said " yes " .', "He agreed ."), 1)
    cola = load_task("cola", train_file=glue / "CoLA/train.tsv", validation_file=glue / "CoLA/dev.tsv")
    assert len(cola.train) == 3 and cola.eval["validation"][1] == Example(("The dog ran.",), 1)


def test_text_fields_arity_errors(tmp_path):
    train = write(tmp_path / "t.csv", "a,b,c,label\n1,2,3,0\n")
    with pytest.raises(DataError, match="one or two column names, got 3"):
        load_task(train_file=train, text_fields=["a", "b", "c"])
    with pytest.raises(DataError, match="task mrpc takes 2 text fields"):
        load_task("mrpc", train_file=train, text_fields=["a"])


def test_explicit_file_errors(tmp_path):
    with pytest.raises(NotFoundError, match="data file not found"):
        load_task(train_file=tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_task(train_file=write(tmp_path / "x.txt", "a"))
    with pytest.raises(DataError, match="file is empty"):
        load_task(train_file=write(tmp_path / "e.csv", "\n"))
    with pytest.raises(DataError, match=r"bad.csv:3: expected 2 comma-separated columns, found 3"):
        load_task(train_file=write(tmp_path / "bad.csv", "text,label\na,1\nb,c,1\n"))
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_task(train_file=write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": \n'))
    with pytest.raises(DataError, match=r"miss.jsonl:2: no value for label column 'label'"):
        load_task(train_file=write(tmp_path / "miss.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n'))
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_task(train_file=write(tmp_path / "latin.csv", "text,label\ncaf\u00e9,1\n", encoding="latin-1"))
    with pytest.raises(DataError, match="cannot tell which columns hold the text; columns are: x, label"):
        load_task(train_file=write(tmp_path / "nt.csv", "x,label\na,1\n"))
    with pytest.raises(DataError, match=r"missing column 'label'; columns are: text, y"):
        load_task(train_file=write(tmp_path / "nl.csv", "text,y\na,1\n"))
    with pytest.raises(InvalidValueError, match="needs --train-file|training needs"):
        load_task(validation_file=write(tmp_path / "v.csv", "text,label\na,1\n"))


def test_custom_eval_label_outside_train_labels(tmp_path):
    train = write(tmp_path / "t.csv", "text,label\na,cat\nb,dog\n")
    dev = write(tmp_path / "d.csv", "text,label\nc,cat\nd,bird\n")
    with pytest.raises(DataError, match=r"d.csv:3: unknown label 'bird'.*allowed: cat, dog"):
        load_task(train_file=train, validation_file=dev)


def test_glue_task_csv_with_out_of_range_id(tmp_path):
    train = write(tmp_path / "t.csv", "sentence,label\na,2\n")
    with pytest.raises(DataError, match=r"t.csv:2: unknown label '2'"):
        load_task("sst2", train_file=train)


# --------------------------------------------------------------------------------------------- real GLUE files

@pytest.mark.integration
@pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="real GLUE files not present")
@pytest.mark.parametrize("task,n_train,n_dev,dev_counts", [
    ("cola", 8551, 1043, {0: 322, 1: 721}),
    ("mrpc", 3668, 408, {0: 129, 1: 279}),
    ("stsb", 5749, 1500, None),
    ("rte", 2490, 277, {0: 146, 1: 131}),
    ("wnli", 635, 71, {0: 40, 1: 31}),
])
def test_real_glue_row_counts(task, n_train, n_dev, dev_counts):
    data = load_task(task, data_dir=GLUE_DIR)
    assert len(data.train) == n_train and len(data.eval["validation"]) == n_dev
    labels = [e.label for e in data.eval["validation"]]
    if dev_counts is None:
        assert min(labels) >= 0.0 and max(labels) <= 5.0
    else:
        assert {k: labels.count(k) for k in dev_counts} == dev_counts


def test_numeric_custom_labels_are_values_not_class_ids(tmp_path):
    train = write(tmp_path / "t.csv", "text,label\na,2\nb,10\n")
    dev = write(tmp_path / "d.csv", "text,label\nc,10\nd,0\n")
    with pytest.raises(DataError, match=r"d.csv:3: unknown label '0'.*\(allowed: 2, 10\)"):
        load_task(train_file=train, validation_file=dev)


def test_model_label_names_accept_class_ids(tmp_path):
    dev = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "LABEL_0"}\n')
    data = load_task(validation_file=dev, need_train=False, labels=["LABEL_0", "LABEL_1"])
    assert [e.label for e in data.eval["validation"]] == [1, 0]
