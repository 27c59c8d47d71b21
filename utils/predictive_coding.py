"""Predictive coding for the MLP (Whittington & Bogacz 2017): value nodes relax to lower an energy of prediction
errors, then each weight learns from the error it predicts and the activity it comes from (local, Hebbian).

    net = MLP(784, (256, 256), 10, rule="pc")     # PCConfig's fields are keyword arguments

Value nodes v_l of the hidden layers l = 1..k (the pre-activations; v_0 = x is clamped), predictions
mu_l = W_l f(v_(l-1)) + b_l with f = relu on the hidden layers (f(v_0) = x), errors eps_l = v_l - mu_l. The output
is clamped to the target t through the energy's output term, whose error is eps_L = -dE_out/dmu_L: t - softmax(mu_L)
for the cross-entropy (t = p - e, the one-hot label of the loss's backward pass), t - mu_L for the squared error.

* Initialisation: v_l = mu_l, the forward pass (every hidden error 0).
* Inference, T steps at rate gamma: v_l <- v_l - gamma dE/dv_l, E = sum_l ||eps_l||^2 / 2 + beta E_out.
* Weights: W_l descends E at the relaxed nodes, dE/dW_l = -eps_l f(v_(l-1))^T (mean over the batch, divided by the
  output term's weight beta so that the updates are in the loss's units).
* fixed_prediction: the predictions, ReLU derivatives and presynaptic activities held at the forward pass (the
  simplification under which the relaxed errors are exactly backprop's deltas; a test setting).

The test-time forward pass is the plain MLP. Updates are returned as gradients (utils.rules runs them through the
estimator's optimizer).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ENERGY_OUTPUTS = ("cross_entropy", "squared")


@dataclass
class PCConfig:
    inference_steps: int = 10            # T: relaxation steps of the value nodes per batch (each ~ a forward-backward)
    inference_rate: float = 0.2          # gamma: step size of the relaxation (Euler step of the inference dynamics)
    energy_output: str = "cross_entropy" # the energy's output term: "cross_entropy" (the loss) or "squared"
    output_weight: float = 1.0           # beta: the output term's weight (W&B's output precision 1/Sigma_L); small
    #                                      beta keeps the errors small and the updates near backprop's
    fixed_prediction: bool = False       # hold predictions at the forward pass (then exactly backprop; for tests)


class PredictiveCoding(nn.Module):
    """Predictive coding's inference and weight updates for an MLP (no parameters of its own)."""

    config = PCConfig

    def __init__(self, sizes, n_classes, **settings):
        super().__init__()
        cfg = self.config(**settings)
        if cfg.energy_output not in ENERGY_OUTPUTS:
            raise ValueError(f"energy_output={cfg.energy_output!r}; valid: {', '.join(ENERGY_OUTPUTS)}")
        if int(cfg.inference_steps) < 0 or not float(cfg.inference_rate) > 0 or not float(cfg.output_weight) > 0:
            raise ValueError(f"inference_steps={cfg.inference_steps!r} must be >= 0, inference_rate="
                             f"{cfg.inference_rate!r} and output_weight={cfg.output_weight!r} > 0")
        self.cfg = cfg
        self.steps, self.rate = int(cfg.inference_steps), float(cfg.inference_rate)
        self.energy_output, self.fixed_prediction = cfg.energy_output, bool(cfg.fixed_prediction)
        self.beta = float(cfg.output_weight)

    def output_error(self, mu, t):
        """eps_L = -beta dE_out/dmu_L (Whittington & Bogacz's clamped output error, the loss as output term)."""
        return self.beta * (t - (torch.softmax(mu, 1) if self.energy_output == "cross_entropy" else mu))

    def errors(self, Ws, bs, x, v, t):
        """(hidden errors eps_1..eps_k, output error eps_L, presynaptic activities f(v_0)..f(v_k), each example's
        energy E) at nodes v; E = sum_l ||eps_l||^2 / 2 + beta E_out (W&B 2017's free energy F, the loss as output
        term: the cross-entropy -sum t log softmax(mu_L), or ||t - mu_L||^2 / 2)."""
        f = [x] + [torch.relu(a) for a in v]
        mu = [F.linear(h, W, b) for h, W, b in zip(f, Ws, bs)]   # W&B 2017: mu_l = W_l f(v_(l-1))
        eps = [a - m for a, m in zip(v, mu)]
        out = (-(t * torch.log_softmax(mu[-1], 1)).sum(1) if self.energy_output == "cross_entropy"
               else 0.5 * (t - mu[-1]).square().sum(1))
        return eps, self.output_error(mu[-1], t), f, sum(0.5 * e.square().sum(1) for e in eps) + self.beta * out

    def energy(self, Ws, bs, x, v, t):
        """E summed over the batch (errors)."""
        return self.errors(Ws, bs, x, v, t)[3].sum()

    def step(self, Ws, v, eps, eps_out, gates, rate=None):
        """One inference step: v_l <- v_l + gamma (-eps_l + f'(v_l) * W_(l+1)^T eps_(l+1)) (W&B 2017's dynamics,
        the gradient descent of E); gates: f'(v_l); rate: gamma (default inference_rate), or one per example."""
        rate, above = self.rate if rate is None else rate, eps[1:] + [eps_out]
        return [a + rate * (-e + g * (up @ W)) for a, e, g, up, W in zip(v, eps, gates, above, Ws[1:])]

    def relax(self, Ws, bs, x, pre, t, energies=None):
        """The relaxed errors ([eps_1 .. eps_k, eps_L]) and presynaptic activities after T inference steps; a list
        `energies` receives the batch's E before each step and after the last (full inference only).

        A step that would raise an example's energy is not taken and that example's rate is halved (backtracking):
        each example's energy falls monotonically even where gamma is too large for the weights (large W^T W)."""
        v = [a.clone() for a in pre[:-1]]
        if self.fixed_prediction:   # the predictions, derivatives and activities of the forward pass throughout
            f, gates = [x] + [torch.relu(a) for a in v], [(a > 0).to(a.dtype) for a in v]
            eps, eps_out = [torch.zeros_like(a) for a in v], self.output_error(pre[-1], t)
            for _ in range(self.steps):   # mu fixed: the step of v_l = mu_l + eps_l is eps_l's
                eps = self.step(Ws, eps, eps, eps_out, gates)
            return eps + [eps_out], f
        rate = torch.full((len(x), 1), self.rate, dtype=x.dtype, device=x.device)
        state = (v, *self.errors(Ws, bs, x, v, t))   # v, eps, eps_out, f, E
        for _ in range(self.steps):
            if energies is not None:
                energies.append(float(state[4].sum()))
            v, eps, eps_out = state[:3]
            new = self.step(Ws, v, eps, eps_out, [(a > 0).to(a.dtype) for a in v], rate)
            proposal = (new, *self.errors(Ws, bs, x, new, t))
            ok = proposal[4] <= state[4]
            state = _where(ok, proposal, state)
            rate = torch.where(ok[:, None], rate, rate / 2)
        if energies is not None:
            energies.append(float(state[4].sum()))
        return state[1] + [state[2]], state[3]

    @torch.no_grad()
    def updates(self, Ws, bs, x, pre, error):
        """The gradients of (W_1, b_1, .., W_L, b_L) that predictive coding's step descends, from the input x, the
        pre-activations pre = [a_1 .. a_k, z] of the forward pass and error = dL/dz of the batch's mean loss."""
        n = len(error)
        t = torch.softmax(pre[-1], 1) - n * error   # the target: the one-hot label under the cross-entropy
        eps, f = self.relax(Ws, bs, x, pre, t)
        grads = []
        for e, h in zip(eps, f):                    # W&B 2017: dW_l ~ eps_l f(v_(l-1))^T, Hebbian
            grads += [-(e.t() @ h) / (n * self.beta), -e.sum(0) / (n * self.beta)]   # in the loss's units
        return grads


def _where(ok, new, old):
    """Per example (rows), `new` where ok else `old`, through nested lists and tuples of tensors."""
    if isinstance(new, (list, tuple)):
        return type(new)(_where(ok, a, b) for a, b in zip(new, old))
    return torch.where(ok.view(-1, *([1] * (new.ndim - 1))), new, old)
