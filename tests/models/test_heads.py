"""The distillation head: cosine logits in fp32 whatever the parameters' dtype, the prototype
weight read inside its own module (what ZeRO-3 gathers), and a frozen prototype layer."""
import torch

from megaclip.models.heads import CosinePrototypes, PrototypeHead


def test_cosine_logits_are_fp32_from_bf16_parameters():
    torch.manual_seed(0)
    head = PrototypeHead(16, 32, 8, 64).to(torch.bfloat16)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    logits = head(x)
    assert logits.dtype == torch.float32 and logits.shape == (3, 5, 64)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1).float()
    w = torch.nn.functional.normalize(head.prototypes.weight.float(), dim=-1)
    torch.testing.assert_close(logits, z @ w.T, rtol=0, atol=0)
    assert logits.abs().max() <= 1 + 1e-5


def test_the_head_reads_no_parameter_of_a_submodule_itself():
    """Every parameter is a direct parameter of the module whose forward reads it."""
    head = PrototypeHead(16, 32, 8, 64)
    assert [n for n, _ in head.named_parameters(recurse=False)] == []
    assert [n for n, _ in head.prototypes.named_parameters()] == ["weight"]


def test_a_frozen_prototype_layer_gets_no_gradient_and_the_rest_learns():
    torch.manual_seed(0)
    head = PrototypeHead(16, 32, 8, 64)
    head.prototypes.frozen = True
    head(torch.randn(4, 16)).logsumexp(-1).sum().backward()
    assert head.prototypes.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.mlp.parameters())
    head.zero_grad()
    head.prototypes.frozen = False
    head(torch.randn(4, 16)).logsumexp(-1).sum().backward()
    assert head.prototypes.weight.grad.abs().sum() > 0


def test_initialisation_is_that_of_a_linear_layer():
    torch.manual_seed(3)
    a = CosinePrototypes(8, 10).weight
    torch.manual_seed(3)
    b = torch.nn.Linear(8, 10, bias=False).weight
    assert torch.equal(a, b)
