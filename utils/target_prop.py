"""Difference target propagation for the MLP: DTP (Lee, Zhang, Fischer & Bengio 2015, as in Bartunov et al. 2018,
Algorithm 1) and simplified DTP (SDTP, Bartunov et al. 2018). Targets instead of gradients, learned inverses,
and losses local to each layer.

    net = MLP(784, (256, 256), 10, rule="dtp")     # or "sdtp"; DTPConfig's fields are keyword arguments

The MLP: h_0 = x, h_l = f_l(h_(l-1)) = relu(W_l h_(l-1) + b_l) for the hidden layers l = 1..k, logits
z = W_L h_k + b_L and probabilities p = softmax(z) (L = k + 1). Inverse g_l(h_l) = V_l h_l + c_l maps layer l back
to layer l-1 (linear; see below). e = dL/dz per example, from the loss's backward pass.

* DTP: the first target by one gradient step through the output layer, h^_k = h_k - eta e W_L (the one place a
  gradient crosses a layer); inverses g_2..g_k.
* SDTP: the output target h^_L = p - eta e (for the cross-entropy and eta = 1 the one-hot label) and h^_k by the
  difference correction as well (inverse g_L from p); inverses g_2..g_L; no gradient anywhere but within a layer.
* Below: h^_(l-1) = h_(l-1) + g_l(h^_l) - g_l(h_l), the difference correction.
* Forward layers: hidden layer l minimises ||f_l(h_(l-1)) - h^_l||^2 / 2 with its input h_(l-1) detached; the
  output layer minimises the loss L itself (its gradient e h_k^T, local to it).
* Inverses: g_l minimises ||g_l(f_l(h~)) - h~||^2 / 2 on the corrupted activity h~ = h_(l-1) + n, n ~ N(0, sigma^2)
  (f_l detached: f_L is softmax(W_L . + b_L) under SDTP), at their own Adam rate `inverse_lr`.

The inverses are linear because the hidden activities are ReLU's: a ReLU inverse passes no correction through its
silent units, and tanh's range does not cover them. Every target offset is then linear in eta, so under Adam (which
removes a gradient's scale) eta matters only through Adam's epsilon. The corruption is drawn from torch's global
generator (seeded by the estimator's fit; a checkpoint does not carry it). Updates are returned as gradients
(utils.rules runs them through the estimator's optimizer); every loss is a mean over the batch.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DTPConfig:
    noise: float = 0.1          # sigma: standard deviation of the Gaussian corruption the inverses learn on
    inverse_lr: float = 1e-3    # Adam learning rate of the inverses (the forward weights take the estimator's lr)
    target_step: float = 0.1    # eta: step of the first target along -e (DTP: on h_k; SDTP: on p, 1 = the label)


@dataclass
class SDTPConfig(DTPConfig):
    target_step: float = 1.0    # eta = 1: the output target is the one-hot label (cross-entropy)


class DTP(nn.Module):
    """The learned inverses of an MLP with hidden `sizes[1:]` and input `sizes[0]`, and DTP's updates."""

    simplified = False   # SDTP: the first target by the difference correction too
    config = DTPConfig

    def __init__(self, sizes, n_classes, **settings):
        super().__init__()
        self.cfg = cfg = self.config(**settings)
        if not (cfg.noise >= 0 and cfg.inverse_lr > 0 and cfg.target_step > 0):
            raise ValueError(f"noise={cfg.noise!r} must be >= 0, inverse_lr={cfg.inverse_lr!r} and target_step="
                             f"{cfg.target_step!r} > 0")
        self.noise, self.inverse_lr, self.target_step = float(cfg.noise), float(cfg.inverse_lr), float(cfg.target_step)
        dims = list(sizes) + [int(n_classes)]                 # n_0 .. n_L
        top = len(dims) - 1 if self.simplified else len(dims) - 2
        self.first = 2                                        # g_l for l = 2 .. top, inverses[l - 2]
        self.inverses = nn.ModuleList(nn.Linear(dims[l], dims[l - 1]) for l in range(self.first, top + 1))

    def g(self, l, h):
        return self.inverses[l - self.first](h)

    @torch.no_grad()
    def targets(self, Ws, hs, z, e):
        """The targets h^_1 .. h^_k of the hidden layers from their activities hs = [h_0 .. h_k], the logits z and
        the per-example output error e = dL/dz."""
        k = len(hs) - 1
        if self.simplified:   # Bartunov et al. 2018, SDTP: h^_L = argmin L; difference correction for h^_k too
            out = torch.softmax(z, 1)
            top = hs[k] + (self.g(k + 1, out - self.target_step * e) - self.g(k + 1, out))
        else:                 # Lee et al. 2015 / Bartunov Alg. 1: h^_(L-1) = h_(L-1) - eta dL/dh_(L-1)
            top = hs[k] - self.target_step * e @ Ws[-1]
        hat = {k: top}
        for l in range(k, 1, -1):   # Lee et al. 2015 / Bartunov Alg. 1: h^_(l-1) = h_(l-1) + g_l(h^_l) - g_l(h_l)
            hat[l - 1] = hs[l - 1] + (self.g(l, hat[l]) - self.g(l, hs[l]))
        return [hat[l] for l in range(1, k + 1)]

    def layer_losses(self, Ws, bs, hs, targets, error):
        """Each forward layer's local loss, its input detached: hidden ||f_l(h_(l-1)) - h^_l||^2 / 2, the output
        layer's the loss's first-order term <z, dL/dz> (its gradient is the loss's); means over the batch."""
        n = len(error)
        losses = [0.5 * (torch.relu(F.linear(h.detach(), W, b)) - t).square().sum() / n
                  for W, b, h, t in zip(Ws[:-1], bs[:-1], hs[:-1], targets)]
        return losses + [(F.linear(hs[-1].detach(), Ws[-1], bs[-1]) * error).sum()]

    def inverse_losses(self, Ws, bs, hs):
        """Each inverse's reconstruction loss on noise-corrupted activity, the forward layer detached (Lee et al.
        2015; Bartunov Alg. 1): ||g_l(f_l(h~)) - h~||^2 / 2, h~ = h_(l-1) + sigma n, mean over the batch."""
        losses = []
        for l in range(self.first, self.first + len(self.inverses)):
            h = hs[l - 1].detach()
            h = h + self.noise * torch.randn_like(h)
            up = F.linear(h, Ws[l - 1].detach(), bs[l - 1].detach())
            up = torch.relu(up) if l < len(Ws) else torch.softmax(up, 1)
            losses.append(0.5 * (self.g(l, up) - h).square().sum() / len(h))
        return losses

    def updates(self, Ws, bs, x, pre, error):
        """The gradients of (W_1, b_1, .., W_L, b_L, then this module's parameters) that DTP's step descends, from
        the input x, the pre-activations pre = [a_1 .. a_k, z] of the forward pass and error = dL/dz of the batch's
        mean loss."""
        hs = [x] + [torch.relu(a) for a in pre[:-1]]
        targets = self.targets(Ws, hs, pre[-1], error * len(error))
        params = [p for pair in zip(Ws, bs) for p in pair]
        own = list(self.parameters())
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in params]
            loss = sum(self.layer_losses(leaves[0::2], leaves[1::2], hs, targets, error))
            forward = torch.autograd.grad(loss, leaves)
            if not own:
                return list(forward)
            return list(forward) + list(torch.autograd.grad(sum(self.inverse_losses(Ws, bs, hs)), own))


class SDTP(DTP):
    """Simplified DTP (Bartunov et al. 2018): the output target from the label, inverses up to the output layer."""

    simplified = True
    config = SDTPConfig
