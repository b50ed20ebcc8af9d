"""A resume with settings other than the checkpoint's recorded recipe says which (another VAE,
RoPE, data seed, an EMA turned off went on silently, exit 0)."""

from __future__ import annotations

from engine_helpers import TINY

from minfm_core.cli.main import main


def _run(exp, capsys, *sets: str, err: list | None = None) -> str:
    args = ["run", str(TINY), "--set", f"run.exp_dir={str(exp)!r}", "--set", "train.ckpt_every=1"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    captured = capsys.readouterr()
    if err is not None:
        err.append(captured.err)
    return captured.out


def test_a_resume_names_the_settings_that_differ_from_the_checkpoints(tmp_path, capsys):
    exp = tmp_path / "run"
    _run(exp, capsys, "train.max_steps=1")
    out = _run(exp, capsys, "train.max_steps=2", "train.lr=0.002")  # lr: not watched (it follows its schedule)
    assert "resumed from" in out and "warning" not in out
    err: list[str] = []
    out = _run(exp, capsys, "train.max_steps=3", "model.denoiser.rope_theta=500", "data.seed=1", "train.ema_decay=0",
               "run.seed=7", err=err)
    # the loader's own line names the setting too (it said "data: resuming with seed 7 instead of 0")
    assert ("minfm: warning: data: resuming with shuffle seed 7 instead of 0 (run.seed): the data order differs "
            "from the checkpoint's") in err[0]
    assert ("minfm: warning: resumed with settings other than the checkpoint's: data.seed: 0 -> 1; "
            "model.denoiser.rope_theta: 10000 -> 500; run.seed: 0 -> 7; train.ema_decay: 0.99 -> 0.0\n") in out


def test_the_list_is_cut_and_an_unreadable_record_says_nothing(tmp_path):
    from minfm_core.engine.train import recipe_changes

    (tmp_path / "r.toml").write_text("[model.denoiser]\n" + "".join(f"k{i} = {i}\n" for i in range(9)))
    changed = recipe_changes(tmp_path / "r.toml", "[model.denoiser]\n")
    assert changed.startswith("model.denoiser.k0: 0 -> (unset); ") and changed.endswith("; and 3 more")
    (tmp_path / "bad.toml").write_text("[model")
    assert recipe_changes(tmp_path / "bad.toml", "") is None
    assert recipe_changes(tmp_path / "missing.toml", "") is None


def test_weights_the_model_lacks_are_refused_on_resume_and_init_from(tmp_path, capsys):
    """A recipe with one double block fewer took a checkpoint's weights and dropped that block's
    in silence (init_from, exit 0), or blamed the optimizer's param groups (a resume)."""
    src = tmp_path / "src"
    _run(src, capsys, "train.max_steps=2")
    fewer = ["run", str(TINY), "--set", "model.denoiser.n_ds_blocks=0", "--set", "train.max_steps=3"]
    for where in (["--set", f"run.exp_dir={str(src)!r}"],
                  ["--set", f"run.exp_dir={str(tmp_path / 'new')!r}", "--set", f"train.init_from={str(src)!r}",
                   "--set", 'train.init_load_plan="model:model,ema:ema"']):
        assert main([*fewer, *where]) == 2
        err = capsys.readouterr().err
        assert "(model weights): weights do not fit the model: unexpected keys: double_blocks.0." in err, err
