"""Every DESIGN §4 record format through ``load_split``: fixture files in each benchmark's real layout,
normalised rows checked against hand-written values, and malformed inputs refused with file:line."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed import REPO
from mtpeft.errors import DataError
from mtpeft.tasks.formats import FORMATS
from mtpeft.tasks.loading import load_split

FIX = REPO / "tests" / "fixtures" / "formats"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def rows(path, fmt, max_examples=0):
    return load_split(str(path), fmt, max_examples).to_list()


def test_bigclonebench_hub_layout_bool_and_int_labels():
    got = rows(FIX / "bigclonebench.jsonl", "bigclonebench")
    assert got == [
        {"text_a": "int add(int a, int b) { return a + b; }", "text_b": "int sum(int x, int y) { return x + y; }", "label": 1},
        {"text_a": "void f() { print(1); }", "text_b": "int g(int n) { return n * 2; }", "label": 0},
        {"text_a": "int mul(int a, int b) { return a * b; }",
         "text_b": "int times(int a, int b) { int r = a * b; return r; }", "label": 1},
    ]


def test_bigclonebench_codexglue_pairs_resolve_idx_in_data_jsonl():
    got = rows(FIX / "codexglue_clone" / "train.txt", "bigclonebench_codexglue")
    add, total, log = ("public int add(int a, int b) { return a + b; }", "public int sum(int x, int y) { return x + y; }",
                       "public void log(String s) { System.out.println(s); }")
    assert got == [{"text_a": add, "text_b": total, "label": 1}, {"text_a": add, "text_b": log, "label": 0}]


def test_codexglue_missing_idx_names_the_txt_line():
    bad = FIX / "codexglue_clone" / "bad_idx.txt"
    with pytest.raises(DataError, match=rf"{bad}:2: idx '999' is not in .*data.jsonl"):
        load_split(str(bad), "bigclonebench_codexglue")


def test_codexglue_needs_data_jsonl_beside_the_pairs(tmp_path):
    (tmp_path / "train.txt").write_text("1\t2\t0\n")
    with pytest.raises(DataError, match="data.jsonl: dataset file not found; format bigclonebench_codexglue needs"):
        load_split(str(tmp_path / "train.txt"), "bigclonebench_codexglue")
    with pytest.raises(DataError, match="reads the CodeXGLUE pair list"):
        load_split(str(FIX / "bigclonebench.jsonl"), "bigclonebench_codexglue")


def test_codexglue_pair_line_shape(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"func": "a", "idx": "1"}\n{"func": "b", "idx": 2}\n')
    (tmp_path / "t.txt").write_text("1\t2\t1\n1\t2\n")
    with pytest.raises(DataError, match=r"t.txt:2: expected 'idx1<TAB>idx2<TAB>label', got 2 fields"):
        load_split(str(tmp_path / "t.txt"), "bigclonebench_codexglue")
    (tmp_path / "t.txt").write_text("1\t2\tmaybe\n")
    with pytest.raises(DataError, match=r"t.txt:1: field 'label' must be 0/1 or true/false, got 'maybe'"):
        load_split(str(tmp_path / "t.txt"), "bigclonebench_codexglue")


def test_devign_json_list():
    assert rows(FIX / "devign.json", "devign") == [
        {"text": "static int f(int x) { return x; }", "label": 0},
        {"text": "void g(char *s) { strcpy(buf, s); }", "label": 1},
    ]


def test_poj104_string_labels_become_ints_and_get_same_class_partners():
    got = rows(FIX / "poj104.jsonl", "poj104")
    assert [r["label"] for r in got] == [1, 1, 2, 2, 3]
    texts = [r["text"] for r in got]
    # partner = next example of the same class, cyclically; a singleton class is its own partner
    assert [r["positive"] for r in got] == [texts[1], texts[0], texts[3], texts[2], texts[4]]


def test_advtest_and_codesearchnet():
    adv = rows(FIX / "advtest.jsonl", "advtest")
    assert adv == [{"query": "Add two numbers.",
                    "code": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b"}]
    csn = rows(FIX / "codesearchnet.jsonl", "codesearchnet")
    assert csn == [{"query": "Negate x", "code": "def neg(x):\n    return -x"}]


def test_code_to_text_target_is_docstring_and_source_hides_it():
    got = rows(FIX / "code_to_text.jsonl", "code_to_text")
    assert got[0] == {"prompt": "def sq ( x ) : return x * x", "target": "Square x ."}
    # without code_tokens, the docstring is cut out of the code so it cannot be copied
    assert got[1] == {"prompt": "def inc(x):\n    \"\"\"\"\"\"\n    return x + 1", "target": "Add one."}


def test_conala_both_layouts():
    assert rows(FIX / "conala.json", "conala") == [
        {"prompt": "convert list of strings `l` to integers", "target": "[int(x) for x in l]"},
        {"prompt": "Reverse a string", "target": "s[::-1]"},  # rewritten_intent null: falls back to intent
    ]
    assert rows(FIX / "conala_mined.jsonl", "conala") == [
        {"prompt": "sort dict by value", "target": "sorted(d.items(), key=lambda kv: kv[1])"}]


def test_codealpaca_both_variants():
    assert rows(FIX / "codealpaca.json", "codealpaca") == [
        {"prompt": "Write a function that returns the square of a number.", "target": "def square(x):\n    return x * x"},
        {"prompt": "Sum the list.\nnums = [1, 2, 3]", "target": "total = sum(nums)"},
    ]
    assert rows(FIX / "codealpaca_nlcmd.jsonl", "codealpaca") == [{"prompt": "Print hello.", "target": "print('hello')"}]


def test_apps_prompt_target_and_tests():
    got = rows(FIX / "apps.jsonl", "apps")
    assert got[0]["prompt"] == "Read an integer n and print n + 1.\nUse Standard Input format"
    assert got[0]["target"] == "n = int(input())\nprint(n + 1)"
    assert json.loads(got[0]["input_output"]) == {"inputs": ["1\n", "41\n"], "outputs": ["2\n", "42\n"]}
    assert (got[0]["problem_id"], got[0]["difficulty"], got[0]["starter_code"]) == ("0", "introductory", "")
    assert got[1]["prompt"] == ("Return the sum of a list.\nclass Solution:\n    def total(self, xs):"
                                "\nUse Call-Based format")
    assert got[2]["target"] == "" and got[2]["input_output"] == ""  # no solutions, no tests: kept, not scored


def test_flaky_json_list():
    assert rows(FIX / "flaky.json", "flaky") == [
        {"text": "def test_time():\n    assert time.time() % 2 < 1", "label": 1},
        {"text": "def test_add():\n    assert 1 + 1 == 2", "label": 0},
    ]


def test_parquet_and_max_examples(tmp_path):
    path = tmp_path / "devign.parquet"
    pq.write_table(pa.table({"func": ["a()", "b()", "c()"], "target": [1, 0, 1], "project": ["p"] * 3}), path)
    assert rows(path, "devign") == [{"text": "a()", "label": 1}, {"text": "b()", "label": 0}, {"text": "c()", "label": 1}]
    assert rows(path, "devign", max_examples=2) == [{"text": "a()", "label": 1}, {"text": "b()", "label": 0}]
    pq.write_table(pa.table({"func": ["a()", "b()"], "target": [1, 7]}), path)
    with pytest.raises(DataError, match=rf"{path} row 1: field 'target' must be 0/1 or true/false, got 7"):
        load_split(str(path), "devign")


def test_edited_file_is_not_served_from_cache(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"code": "x", "label": 0}\n')
    assert rows(path, "flaky") == [{"text": "x", "label": 0}]
    path.write_text('{"code": "y", "label": 1}\n{"code": "z", "label": 0}\n')
    assert rows(path, "flaky") == [{"text": "y", "label": 1}, {"text": "z", "label": 0}]


@pytest.mark.parametrize("fmt,lines,message", [
    ("devign", ['{"func": "a", "target": 0}', '{"func": "b", "target": 1'], r":2: malformed JSON"),
    ("devign", ['{"func": "a", "target": 0}', '{"func": "b"}'], r":2: missing required field 'target' for format devign"),
    ("devign", ['{"func": "a\x00", "target": 0}'], r":1: malformed JSON \(Invalid control character at column 12\)"),
    ("devign", ['{"func": "a", "target": "yes"}'], r":1: field 'target' must be 0/1 or true/false, got 'yes'"),
    ("devign", ['{"func": {"body": 1}, "target": 0}'], r":1: field 'func' must be a string .*got dict"),
    ("bigclonebench", ['{"func1": "a", "func2": "b", "label": 2}'], r":1: field 'label' must be 0/1"),
    ("poj104", ['{"code": "a", "label": "one"}'], r":1: field 'label' must be an integer class id"),
    ("poj104", ['{"code": "a", "label": true}'], r":1: field 'label' must be an integer class id"),
    ("advtest", ['{"code": "a"}'], r":1: missing required field 'docstring\|docstring_tokens'"),
    ("conala", ['{"intent": "x", "snippet": 3}'], r":1: field 'snippet' must be a string"),
    ("codealpaca", ['{"instruction": "x", "cmd": "y", "input": 5}'], r":1: field 'input' must be a string"),
    ("apps", ['{"problem_id": 1, "question": "q", "solutions": "[1", "input_output": ""}'],
     r":1: field 'solutions' is not valid JSON"),
    ("apps", ['{"problem_id": 1, "question": "q", "solutions": "[]", "input_output": "{\\"inputs\\": [1]}"}'],
     r":1: field 'input_output' must be a JSON object with 'inputs' and 'outputs' lists"),
    ("apps", ['{"problem_id": 1, "question": "q", "solutions": "[]", '
              '"input_output": "{\\"inputs\\": [1], \\"outputs\\": []}"}'], r":1: field 'input_output' has 1 inputs"),
    ("flaky", ['[1, 2]'], r":1: expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, fmt, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=str(path) + message):
        load_split(str(path), fmt)


def test_malformed_json_list_names_the_row(tmp_path):
    path = tmp_path / "flaky.json"
    path.write_text(json.dumps([{"code": "a", "label": 0}, {"code": "b", "label": "sometimes"}]))
    with pytest.raises(DataError, match=rf"{path} row 1: field 'label' must be 0/1"):
        load_split(str(path), "flaky")
    path.write_text('[{"code": "a",\n "label": }]')
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        load_split(str(path), "flaky")


def test_empty_and_missing_and_unsupported(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="dataset is empty"):
        load_split(str(tmp_path / "e.jsonl"), "devign")
    with pytest.raises(DataError, match="dataset file not found"):
        load_split(str(tmp_path / "nope.jsonl"), "devign")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_split(str(tmp_path / "x.csv"), "devign")
    with pytest.raises(DataError, match=f"{tmp_path} is a folder; name a .json, .jsonl or .parquet file"):
        load_split(str(tmp_path), "devign")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_byte_order_mark_is_dropped(tmp_path, suffix):
    """A UTF-8 BOM (Notepad's "UTF-8 with BOM") gives the same records as the file without it."""
    rows = [{"func": f"int f{i}() {{ return {i}; }}", "target": i % 2} for i in range(6)]
    text = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_split(str(marked), "devign").to_list() == load_split(str(plain), "devign").to_list()


def test_every_format_has_a_fixture():
    fixtures = {"bigclonebench": "bigclonebench.jsonl", "bigclonebench_codexglue": "codexglue_clone/train.txt",
                "devign": "devign.json", "poj104": "poj104.jsonl", "advtest": "advtest.jsonl",
                "codesearchnet": "codesearchnet.jsonl", "code_to_text": "code_to_text.jsonl", "conala": "conala.json",
                "codealpaca": "codealpaca.json", "apps": "apps.jsonl", "flaky": "flaky.json"}
    assert set(fixtures) == set(FORMATS)
    for name, file in fixtures.items():
        assert len(load_split(str(FIX / file), name)) > 0


FIXTURE_FOR_FORMAT = {"bigclonebench_codexglue": "codexglue_clone/train.txt", "devign": "devign.json",
                      "flaky": "flaky.json", "advtest": "advtest.jsonl", "conala": "conala.json",
                      "codealpaca": "codealpaca.json"}


def study_config(name: str):
    """configs/NAME.yaml with every task's data pointed at the fixture in that task's format."""
    import yaml

    from mtpeft.config import from_dict

    path = REPO / "configs" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    for task in raw["tasks"]:
        # the real data lives next to the config (configs/data/...), as the header comment says
        assert task["train"].startswith("data/") and task["eval"].startswith("data/")
        task["train"] = task["eval"] = str(FIX / FIXTURE_FOR_FORMAT[task["format"]])
    return from_dict(raw, base_dir=path.parent, source=str(path))


def test_analysis_config_is_the_code_analysis_study():
    cfg = study_config("analysis")
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-Coder-1.5B"  # a hub id: validated without a download
    assert (cfg.peft.method, cfg.peft.bottleneck, cfg.sampler.kind) == ("serial_adapter", 64, "round_robin")
    assert [(t.name, t.kind, t.format) for t in cfg.tasks] == [
        ("clone", "pair_classify", "bigclonebench_codexglue"), ("defect", "classify", "devign"),
        ("flaky", "classify", "flaky"), ("search", "retrieve", "advtest")]
    assert (cfg.train.max_seq_len, cfg.train.lr, cfg.train.retrieval_temperature) == (512, 2e-4, 0.05)
    assert [t.metric for t in cfg.tasks] == ["f1", "", "f1", ""]  # the study's F1 for clone and flaky tests
    for t in cfg.tasks:
        assert len(load_split(t.train, t.format)) > 0


def test_codegen_config_is_the_code_generation_study():
    cfg = study_config("codegen")
    assert cfg.model.name_or_path == "codellama/CodeLlama-7b-hf"
    assert (cfg.peft.method, cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout) == ("lora", 16, 32.0, 0.05)
    assert set(cfg.peft.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert [(t.name, t.kind, t.format) for t in cfg.tasks] == [("conala", "generate", "conala"),
                                                               ("codealpaca", "generate", "codealpaca")]
    for t in cfg.tasks:
        assert len(load_split(t.train, t.format)) > 0



def test_unreachable_hub_id_is_one_error_line():
    # conftest sets HF_DATASETS_OFFLINE=1: the hub client fails, the user gets file-free advice
    with pytest.raises(DataError, match=r"nobody/no-such-dataset:test: could not load hub dataset 'nobody/no-such-dataset'"):
        load_split("nobody/no-such-dataset:test", "devign")


def test_hub_dataset_rows_are_normalised_and_named(monkeypatch):
    # what load_dataset returns for google/code_x_glue_cc_clone_detection_poj104 (labels are strings)
    hub = datasets.Dataset.from_list([{"id": "0", "code": "int main(){}", "label": "5"},
                                      {"id": "1", "code": "int main(){return 0;}", "label": "5"}])
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, split: calls.append((repo, split)) or hub)
    got = rows("google/code_x_glue_cc_clone_detection_poj104:validation", "poj104")
    assert calls == [("google/code_x_glue_cc_clone_detection_poj104", "validation")]
    assert got == [{"text": "int main(){}", "label": 5, "positive": "int main(){return 0;}"},
                   {"text": "int main(){return 0;}", "label": 5, "positive": "int main(){}"}]
    bad = datasets.Dataset.from_list([{"code": "x", "label": "5"}, {"code": "y", "label": "five"}])
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, split: bad)
    with pytest.raises(DataError, match=r"owner/poj:train row 1: field 'label' must be an integer class id"):
        load_split("owner/poj:train", "poj104")
