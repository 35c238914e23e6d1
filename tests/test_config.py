"""Config: every problem listed at once with its key and fix; shipped configs load."""

import subprocess
import sys
from pathlib import Path

import pytest

from tunedex.infra.config import ConfigError, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads_and_names_its_command():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
        assert path.read_text().startswith("# tunedex "), f"{path} must start with the command that runs it"


def test_all_errors_listed_at_once_with_keys_and_fixes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "milvus:\n  urii: http://x:1\n  index_type: FOO\nserve:\n  port: abc\n"
        "chunking: {chunk_size: 100, chunk_overlap: 200}\nbogus: 1\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    msg = str(exc.value)
    assert "has 5 problems" in msg
    assert "milvus.urii: unknown key; did you mean 'uri'?" in msg
    assert "milvus.index_type: 'FOO' is not allowed; use 'HNSW'" in msg
    assert "serve.port: expected an integer, got 'abc'" in msg
    assert "chunking: chunk_overlap (200) must be smaller than chunk_size (100)" in msg
    assert "bogus: unknown key" in msg


@pytest.mark.parametrize(
    "text, needle",
    [
        ("milvus: [1, 2\n", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("milvus:\n  uri: localhost\n", "is not a Milvus URL; use http://HOST:PORT"),
        ("finetune:\n  tiny: {n_embd: 10, n_head: 3}\n", "must be divisible by n_head"),
        ("milvus:\n  collection: 9bad-name\n", "is not a valid collection name"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as exc:
        load_config(path)
    assert needle in str(exc.value)


def test_non_utf8_and_missing_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"milvus:\n  uri: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_and_empty_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    cfg = load_config(path, ["finetune.max_steps=7", "serve.api_key=s3cret", "milvus.index_params={M: 8}"])
    assert cfg.finetune.max_steps == 7
    assert cfg.milvus.index_params == {"M": 8}
    shown = dump_config(cfg)
    assert "s3cret" not in shown and "api_key: '***'" in shown
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["finetune.max_steps"])
    with pytest.raises(ConfigError, match="finetune.max_stepz: unknown key; did you mean 'max_steps'"):
        load_config(None, ["finetune.max_stepz=3"])


def test_the_corpus_comes_from_the_command_or_the_config_and_neither_names_both_fixes(tmp_path):
    cfg = load_config(None, [])
    assert cfg.corpus.path is None
    with pytest.raises(ConfigError, match=r"no corpus: pass `tunedex index PATH` or set corpus.path"):
        cfg.corpus_root(None, "`tunedex index PATH`")
    assert cfg.corpus_root(str(tmp_path), "x") == tmp_path
    configured = load_config(None, [f"corpus.path={tmp_path / 'docs'}"])
    assert configured.corpus_root(None, "x") == tmp_path / "docs"
    assert configured.corpus_root(tmp_path, "x") == tmp_path  # the command's own wins


def _keys(model, prefix=""):
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _keys(ann, f"{prefix}{name}.")
        else:
            yield prefix, name


def test_config_reference_documents_every_key():
    from tunedex.infra.config import TunedexConfig

    doc = (REPO / "docs" / "config.md").read_text()
    missing = [f"{p}{k}" for p, k in _keys(TunedexConfig) if f"| `{k}` |" not in doc]
    assert not missing, f"docs/config.md lacks {missing}"


def test_local_milvus_lite_25_refuses_an_index_it_lacks():
    with pytest.raises(ConfigError, match="index_type HNSW is not available on milvus.local_engine milvus-lite-2.5"):
        load_config(None, ["milvus.index_type=HNSW"])
    assert load_config(None, ["milvus.index_type=HNSW", "milvus.local_engine=milvus-lite-3"]).milvus.index_type == "HNSW"
    assert load_config(None, ["milvus.index_type=HNSW", "milvus.uri=http://milvus:19530"]).milvus.index_type == "HNSW"


def test_help_and_config_check_load_no_heavy_library(tmp_path):
    """`tunedex --help` and `tunedex config check` stay quick: no pymilvus, Ray, torch, vLLM or Prefect loaded;
    every error class derives from one TunedexError that the CLI prints as a line."""
    probe = ("import sys\nfrom tunedex.cli import app\n"
             "for argv in (['--help'], ['config', 'check', sys.argv[1]]):\n"
             "    try:\n        app(argv)\n    except SystemExit:\n        pass\n"
             "print('LOADED', sorted(m for m in ('pymilvus', 'ray', 'torch', 'transformers', 'vllm', 'prefect', 'grpc')"
             " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(REPO / "configs/local.yaml")], capture_output=True,
                         text=True, check=True).stdout
    assert "Commands" in out and "configs/local.yaml: ok" in out
    assert out.splitlines()[-1] == "LOADED []", out.splitlines()[-1]


def test_one_override_syntax_a_bare_key_value_is_refused_with_the_set_form(tmp_path):
    """`--set K=V` on every command; `tunedex finetune CFG k=v` (LLaMA-Factory's form) exits 2 showing `--set`,
    before anything loads; --set reaches the finetune config like every other command's."""
    cli = str(Path(sys.executable).parent / "tunedex")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("finetune: {max_steps: 3}\n")
    bare = subprocess.run([cli, "finetune", str(cfg), "finetune.max_steps=20"], capture_output=True, text=True)
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert f"pass it as --set finetune.max_steps=20 (e.g. tunedex finetune {cfg} --set finetune.max_steps=20)" in bare.stderr
    extra = subprocess.run([cli, "finetune", str(cfg), "other.yaml"], capture_output=True, text=True)
    assert extra.returncode == 2 and "unexpected argument 'other.yaml'" in extra.stderr
    bad = subprocess.run([cli, "finetune", str(cfg), "--set", "finetune.max_stepz=20"], capture_output=True, text=True)
    assert bad.returncode == 2 and "finetune.max_stepz: unknown key; did you mean 'max_steps'" in bad.stderr
    shown = subprocess.run([cli, "config", "show", "-c", str(cfg), "--set", "finetune.max_steps=20"],
                           capture_output=True, text=True, check=True).stdout
    assert "max_steps: 20" in shown


def test_the_bm25_analyzer_is_english_where_the_engine_has_it():
    assert load_config(REPO / "configs/local.yaml").milvus.analyzer == "english"
    lite3 = ["milvus.local_engine=milvus-lite-3"]
    assert load_config(REPO / "configs/local.yaml", lite3).milvus.analyzer == "standard"
    with pytest.raises(ConfigError, match="text_analyzer english is not available on milvus.local_engine milvus-lite-3"):
        load_config(REPO / "configs/local.yaml", [*lite3, "milvus.text_analyzer=english"])
