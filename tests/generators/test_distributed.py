"""The one training loop (``generators.training.fit``) under a real torch.distributed group:
two CPU processes (gloo, started with spawn as torchrun would start them) train the cGAN
recipe data parallel. Each rank sees its own images and noise; averaged gradients and
rank 0's buffers keep both ranks' networks bit-identical; the history is the mean over the
ranks; rank 0's checkpoint resumes both ranks bit for bit; a control refuses the group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from generators.architectures.cgan import cgan_recipe, config_for
from generators.errors import GeneratorError
from generators.train_spec import TrainSpec
from generators.training import fit, train_generator
from tests.generators.test_architectures import phantoms

WORLD = 2
# upsample style: batch norm in the generator (buffers), spectral norm and minibatch-stddev
# in the discriminator; paired masks and DiffAugment: every cgan feature that touches fit
SPEC = {
    "epochs": 2,
    "batch_size": 4,
    "latent_dim": 8,
    "base_channels": 4,
    "seed": 3,
    "lr_discriminator": 1e-3,
    "cgan_style": "upsample",
    "with_masks": True,
    "diffaugment": True,
    "checkpoint_every": 1,
}


def _train(spec: TrainSpec, checkpoint: Path, steps: list[dict[str, float]] | None = None):
    """The cGAN recipe through ``fit`` (what ``train_cgan`` does), keeping the recipe so
    that the test can compare every network of every rank; ``steps`` collects the step losses."""
    data = phantoms()
    recipe = cgan_recipe(config_for(data, spec), spec)
    if steps is not None:
        step = recipe.step

        def recording(batch, ctx):
            losses = step(batch, ctx)
            steps.append(losses)
            return losses

        recipe.step = recording
    result = fit(recipe, data, spec, checkpoint=checkpoint, with_masks=spec.with_masks)
    networks = {name: network.state_dict() for name, network in recipe.networks.items()}
    return {"ema": result.state, **networks}, result


def _worker(rank: int, world: int, tmp: str) -> None:
    """One rank, as under ``torchrun --nproc_per_node 2``."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        out = Path(tmp)
        steps: list[dict[str, float]] = []
        full, result = _train(TrainSpec(**SPEC), out / "full.ckpt", steps)
        torch.save(full, out / f"full{rank}.pt")
        (out / f"steps{rank}.json").write_text(json.dumps({"steps": steps, "history": result.history}))
        # a run stopped after epoch 1 leaves rank 0's checkpoint; the rerun resumes every rank
        _train(TrainSpec(**{**SPEC, "epochs": 1}), out / "cut.ckpt")
        resumed, again = _train(TrainSpec(**SPEC), out / "cut.ckpt")
        torch.save(resumed, out / f"resumed{rank}.pt")
        (out / f"resumed{rank}.json").write_text(json.dumps({"from": again.resumed_from_epoch}))
        try:
            train_generator(TrainSpec(epochs=1, architecture="noise"), phantoms())
            (out / f"control{rank}.txt").write_text("trained")
        except GeneratorError as exc:
            (out / f"control{rank}.txt").write_text(str(exc))
    finally:
        torch.distributed.destroy_process_group()


def _assert_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for part in first:
        assert first[part].keys() == second[part].keys(), part
        for key in first[part]:
            torch.testing.assert_close(first[part][key], second[part][key], rtol=0, atol=0, msg=f"{part}.{key}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    # spawn, not fork: a forked child inherits other threads' locks half-held (see test_architectures)
    torch.multiprocessing.start_processes(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, start_method="spawn")
    return tmp


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_both_ranks_end_with_identical_networks_after_different_batches(ranks):
    full = [_load(ranks / f"full{r}.pt") for r in range(WORLD)]
    _assert_equal(full[0], full[1])  # generator, discriminator (with buffers) and EMA generator
    assert any("running_mean" in key for key in full[0]["generator"])  # buffers were compared
    steps = [json.loads((ranks / f"steps{r}.json").read_text())["steps"] for r in range(WORLD)]
    assert len(steps[0]) == len(steps[1]) == 2 * 2  # 16 images / 2 ranks / batch 4, 2 epochs
    # each rank's own images, flips, latents and augmentations: its losses differ from the other's
    assert all(a["loss_d"] != b["loss_d"] for a, b in zip(steps[0], steps[1], strict=True))
    single = train_generator(TrainSpec(**SPEC), phantoms())
    assert any(not torch.equal(full[0]["ema"][k], single.state[k]) for k in single.state)  # it ran sharded


def test_history_is_the_mean_of_every_ranks_step_losses(ranks):
    records = [json.loads((ranks / f"steps{r}.json").read_text()) for r in range(WORLD)]
    assert records[0]["history"] == records[1]["history"]
    per_epoch = len(records[0]["steps"]) // 2
    for epoch, row in enumerate(records[0]["history"]):
        for column in ("loss_d", "loss_g"):
            losses = [s[column] for rec in records for s in rec["steps"][epoch * per_epoch : (epoch + 1) * per_epoch]]
            assert row[column] == pytest.approx(sum(losses) / len(losses), rel=1e-12, abs=0)


def test_an_interrupted_run_resumed_from_rank_0s_checkpoint_equals_the_uninterrupted_one(ranks):
    for rank in range(WORLD):
        assert json.loads((ranks / f"resumed{rank}.json").read_text()) == {"from": 1}
        _assert_equal(_load(ranks / f"resumed{rank}.pt"), _load(ranks / f"full{rank}.pt"))
    saved = torch.load(ranks / "full.ckpt", weights_only=True)  # written by rank 0 alone
    _assert_equal({"generator": saved["networks"]["generator"]}, {"generator": _load(ranks / "full1.pt")["generator"]})


def test_a_control_refuses_a_process_group_in_one_line(ranks):
    for rank in range(WORLD):
        message = (ranks / f"control{rank}.txt").read_text()
        assert "'noise'" in message and "torchrun" in message and "\n" not in message


def test_each_rank_draws_its_own_rows_of_one_shared_draw():
    """No process group needed: the StepContext of rank r returns rows r*B..(r+1)*B of the
    draw one process would make for the ranks' whole batch, and leaves the generator in the
    same state on every rank; in one process it is a plain draw."""
    from generators.training import StepContext, diff_augment

    def ctx(rank: int, world: int) -> StepContext:
        return StepContext(torch.device("cpu"), False, torch.Generator().manual_seed(7), world, rank)

    whole = torch.randn(6, 2, generator=torch.Generator().manual_seed(7))
    ranks = [ctx(r, 2) for r in range(2)]
    for rank, c in enumerate(ranks):
        torch.testing.assert_close(c.randn(3, 2), whole[3 * rank : 3 * rank + 3], rtol=0, atol=0)
    assert torch.equal(ranks[0].rng.get_state(), ranks[1].rng.get_state())
    torch.testing.assert_close(ctx(0, 1).randn(3, 2), whole[:3], rtol=0, atol=0)
    assert not torch.equal(ranks[0].randint(1000, 4), ranks[1].randint(1000, 4))
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.5  # no zeros before the cutout
    both = diff_augment(torch.cat([x, x]), torch.Generator().manual_seed(1))
    for rank in range(2):
        mine = ctx(rank, 2)
        mine.rng.manual_seed(1)
        torch.testing.assert_close(mine.augment(x), both[2 * rank : 2 * rank + 2], rtol=0, atol=0)
