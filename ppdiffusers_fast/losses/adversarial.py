"""Hinge GAN losses over the discriminator's per-block heads (ALGORITHMS.md, "Adversarial loss").

Each head gives a logit map ``D_h`` (``[B, 1, h, w]`` or any shape); a loss is the mean over a head's
elements, averaged over the heads:

- discriminator: ``L_D = 1/H sum_h [mean relu(1 - D_h(real)) + mean relu(1 + D_h(fake))]``
  (Lim & Ye, "Geometric GAN"; the hinge loss of SAGAN / BigGAN);
- generator, hinge form (the reference's): ``L_G = 1/H sum_h mean relu(1 - D_h(fake))``;
- generator, non-saturating linear form: ``L_G = -1/H sum_h mean D_h(fake)``.

Arguments are a list of per-head tensors, or one tensor for a single head. Computed in float32.
"""
import paddle
import paddle.nn.functional as F

from ._checks import as_head_list, check_same_shape

__all__ = ["hinge_d_loss", "hinge_g_loss", "nonsaturating_g_loss"]


def hinge_d_loss(real_logits, fake_logits):
    """Discriminator hinge loss averaged over heads; real and fake lists pair head by head. 0-d float32 tensor."""
    real_heads = as_head_list(real_logits, "real_logits")
    fake_heads = as_head_list(fake_logits, "fake_logits")
    if len(real_heads) != len(fake_heads):
        raise ValueError(f"real_logits has {len(real_heads)} heads but fake_logits has {len(fake_heads)}")
    total = 0.0
    for index, (real, fake) in enumerate(zip(real_heads, fake_heads)):
        check_same_shape(real, fake, (f"real_logits[{index}]", f"fake_logits[{index}]"))
        total = total + paddle.mean(F.relu(1.0 - real.astype("float32"))) \
            + paddle.mean(F.relu(1.0 + fake.astype("float32")))
    return total / len(real_heads)


def hinge_g_loss(fake_logits):
    """Generator hinge loss ``mean relu(1 - D(fake))`` averaged over heads. 0-d float32 tensor."""
    heads = as_head_list(fake_logits, "fake_logits")
    return sum(paddle.mean(F.relu(1.0 - fake.astype("float32"))) for fake in heads) / len(heads)


def nonsaturating_g_loss(fake_logits):
    """Generator loss ``-mean D(fake)`` averaged over heads (no saturation for confident fakes). 0-d float32 tensor."""
    heads = as_head_list(fake_logits, "fake_logits")
    return -sum(paddle.mean(fake.astype("float32")) for fake in heads) / len(heads)
