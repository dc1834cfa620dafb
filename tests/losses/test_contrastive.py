"""The global-batch contrastive losses at world size 2 equal the single-process ones, values and
gradients (two gloo processes)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaclip.config import ObjectiveConfig
from megaclip.objectives.loss import ObjectiveLoss as Objective
from megaclip.losses import ClipLoss, SigLipLoss

N, D = 8, 16  # global batch, feature size


def _data():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    return img, txt


def _loss(kind):
    return {"clip_local": ClipLoss(local_loss=True), "clip_global": ClipLoss(local_loss=False),
            "siglip": SigLipLoss()}[kind]


def _second_view(img):
    """A second global view's features of the same images (SILC)."""
    return torch.nn.functional.normalize(img + 0.5 * img.roll(1, 1), dim=-1)


def _run(kind, img, txt, rows):
    img = img[rows].clone().requires_grad_(True)
    txt = txt[rows].clone().requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    if kind.endswith("_views"):  # the objective's mean over the global views of SILC
        cfg = ObjectiveConfig(contrastive=kind.split("_")[0])
        outputs = {"image_features": img, "view_image_features": _second_view(img)[None],
                   "text_features": txt, "logit_scale": scale, "logit_bias": bias}
        terms, _ = Objective(cfg, 10)(outputs, {})
    else:
        terms = _loss(kind)(image_features=img, text_features=txt, logit_scale=scale,
                            logit_bias=bias)
    (loss,) = terms.values()
    loss.backward()
    return loss.detach(), img.grad, txt.grad, scale.grad, bias.grad


def _worker(rank, world, port, kind, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    img, txt = _data()
    n = N // world
    loss, gi, gt, gs, gb = _run(kind, img, txt, slice(rank * n, (rank + 1) * n))
    # What a data-parallel engine does: average losses and parameter gradients over ranks.
    vec = torch.stack([loss, gs, gb if gb is not None else torch.tensor(0.0)])
    dist.all_reduce(vec)
    # numpy arrays are pickled by value; a tensor's shared memory dies with this process.
    queue.put((rank, (vec / world).numpy(), gi.numpy(), gt.numpy()))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["clip_local", "clip_global", "siglip", "siglip_views",
                                  "clip_views"])
def test_world_size_2_equals_single_process(kind):
    img, txt = _data()
    loss1, gi1, gt1, gs1, gb1 = _run(kind, img, txt, slice(0, N))

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, kind, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: tuple(map(torch.from_numpy, arrays))
               for r, *arrays in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0

    vec = results[0][0]
    torch.testing.assert_close(vec[0], loss1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vec[1], gs1, rtol=1e-5, atol=1e-6)
    if gb1 is not None:
        torch.testing.assert_close(vec[2], gb1, rtol=1e-5, atol=1e-6)
    # Each rank's feature gradient (summed over all ranks' losses by the gather's backward),
    # divided by the world size as the engine's averaging does, is the single-process one.
    gi2 = torch.cat([results[r][1] for r in range(2)]) / 2
    gt2 = torch.cat([results[r][2] for r in range(2)]) / 2
    torch.testing.assert_close(gi2, gi1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt2, gt1, rtol=1e-5, atol=1e-6)


def test_the_contrastive_term_of_several_views_is_the_mean_of_each_view():
    img, txt = _data()
    scale, bias = torch.tensor(10.0), torch.tensor(-2.0)
    other = _second_view(img)
    outputs = {"image_features": img, "view_image_features": other[None], "text_features": txt,
               "logit_scale": scale, "logit_bias": bias}
    terms, _ = Objective(ObjectiveConfig(contrastive="siglip"), 10)(outputs, {})
    each = [SigLipLoss()(image_features=f, text_features=txt, logit_scale=scale,
                         logit_bias=bias)["siglip"] for f in (img, other)]
    torch.testing.assert_close(terms["siglip"], (each[0] + each[1]) / 2)
    assert not torch.allclose(each[0], each[1])  # the views differ, so the mean means something


def test_clip_loss_is_minimal_for_matching_pairs():
    img, _ = _data()
    matched = ClipLoss()(image_features=img, text_features=img, logit_scale=torch.tensor(50.0))
    shuffled = ClipLoss()(image_features=img, text_features=img.roll(1, 0),
                          logit_scale=torch.tensor(50.0))
    assert matched["clip"] < 0.1 < shuffled["clip"]
