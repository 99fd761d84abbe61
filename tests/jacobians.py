"""The full Jacobian dD/dx of a denoiser, by autograd, one sample at a time (a reference for small d)."""

import torch


def jacobian_of(model, x: torch.Tensor, sigma) -> torch.Tensor:
    """(B, d, d): the Jacobian of D(x_b, sigma_b) with respect to x_b for every sample b."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
    out = []
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        out.append(torch.autograd.functional.jacobian(
            lambda z: model(z.reshape(xb.shape), sigma[b:b + 1]).reshape(-1), xb.reshape(-1)))
    return torch.stack(out)
