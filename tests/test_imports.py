"""What the command line imports: `fapm-merge --help` must stay quick (no torch, no
transformers, no mergekit machinery), and `run` still takes every mergekit-yaml flag."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "mergekit", "lm_eval", "peft", "matplotlib")


def _imported_after(code: str) -> list:
    probe = (f"import sys\n{code}\n"
             "print('IMPORTED:' + ','.join(sorted({m.split('.')[0] for m in sys.modules} & "
             f"set({HEAVY!r}))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.rsplit("IMPORTED:", 1)[1].strip()
    return [m for m in line.split(",") if m]


def test_help_imports_no_heavy_library():
    code = ("from fapm_merge.cli import main\n"
            "for args in (['--help'], ['sweep', '--help'], ['inspect', '--help'], "
            "['study', '--help'], ['validate', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass")
    assert _imported_after(code) == []


def test_run_takes_mergekit_yaml_flags():
    from click.testing import CliRunner
    from mergekit.options import MergeOptions

    from fapm_merge.cli import main

    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    for field in ("out_shard_size", "copy_tokenizer", "lazy_unpickle", "num_threads"):
        assert f"--{field.replace('_', '-')}" in result.output
    assert set(MergeOptions.model_fields) >= {"out_shard_size", "num_threads"}


def test_the_plugin_never_imports_the_study():
    code = ("import sys\nimport fapm_merge.methods, fapm_merge.cli, fapm_merge.sweep.run, "
            "fapm_merge.inspect.stats, fapm_merge.demo\n"
            "from fapm_merge.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'fapm_study' not in sys.modules, 'the plugin imported the study'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
