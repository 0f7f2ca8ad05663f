"""pykeops' clients on lazymat against their own dense paths, in one run:
``python -m benchmarks.clients [gpytorch|geomloss] [N ...]``.

- GPyTorch: one training step (the exact marginal log likelihood and its backward: CG
  solves, Lanczos, the preconditioner) of an exact GP, ``gpytorch.kernels.keops.RBFKernel``
  / ``MaternKernel(nu=2.5)`` against ``gpytorch.kernels.RBFKernel`` / ``MaternKernel``,
  float32, D = 3, default settings.
- GeomLoss: ``SamplesLoss("sinkhorn", p=2, blur=0.05)`` value and gradient,
  ``backend="online"`` against ``backend="tensorized"``, float32, D = 3.

One warm run, then one timed run; the table gives the load average, since the machine may be shared.
"""

from __future__ import annotations

import os
import sys
import time

import lazymat

lazymat.install_as_pykeops()

import torch  # noqa: E402


def _best(f, repeat: int = 1) -> float:
    f()  # warm: compiles, caches
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def gpytorch_step(N: int, kind: str, keops: bool) -> float:
    import gpytorch
    from gpytorch.kernels import keops as gk

    g = torch.Generator().manual_seed(0)
    X = torch.rand(N, 3, generator=g)
    Y = torch.sin(6 * X[:, 0]) + 0.1 * torch.randn(N, generator=g)
    if kind == "rbf":
        kernel = gk.RBFKernel() if keops else gpytorch.kernels.RBFKernel()
    else:
        kernel = gk.MaternKernel(nu=2.5) if keops else gpytorch.kernels.MaternKernel(nu=2.5)

    class GP(gpytorch.models.ExactGP):
        def __init__(self, lik):
            super().__init__(X, Y, lik)
            self.mean = gpytorch.means.ConstantMean()
            self.cov = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean(x), self.cov(x))

    lik = gpytorch.likelihoods.GaussianLikelihood()
    model = GP(lik)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)

    def step():
        torch.manual_seed(1)
        model.zero_grad()
        (-mll(model(X), Y)).backward()

    return _best(step)


def geomloss_step(N: int, backend: str) -> float:
    from geomloss import SamplesLoss

    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 3, generator=g).requires_grad_()
    y = torch.rand(N, 3, generator=g)
    loss = SamplesLoss("sinkhorn", p=2, blur=0.05, backend=backend)

    def step():
        v = loss(x, y)
        torch.autograd.grad(v, x)

    return _best(step)


def main(argv: list[str]) -> None:
    which = argv[0] if argv else "all"
    sizes = [int(a) for a in argv[1:]] or [5000, 10000]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    if which in ("all", "gpytorch"):
        print("\n| GPyTorch step | N | KeOps kernel on lazymat | dense kernel | speed-up |")
        print("|---|---|---|---|---|")
        for kind in ("rbf", "matern2.5"):
            for N in sizes:
                k = gpytorch_step(N, kind, True)
                d = gpytorch_step(N, kind, False)
                print(f"| {kind} | {N} | {k:.2f} s | {d:.2f} s | {d / k:.1f}x |", flush=True)
    if which in ("all", "geomloss"):
        print("\n| GeomLoss sinkhorn p=2 | N | online (lazymat) | tensorized | speed-up |")
        print("|---|---|---|---|---|")
        for N in sizes:
            k = geomloss_step(N, "online")
            d = geomloss_step(N, "tensorized")
            print(f"| value + gradient | {N} | {k:.2f} s | {d:.2f} s | {d / k:.1f}x |",
                  flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
