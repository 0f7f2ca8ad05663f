"""Real clients of pykeops on lazymat, through the ``install_as_pykeops()`` switch: GeomLoss'
online and multiscale backends against its tensorized one, GPyTorch's KeOps kernels against
its dense ones. Small sizes; each client runs in a subprocess, so that the switch (which
replaces ``sys.modules["pykeops"]``) stays out of the other tests."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("geomloss")
pytest.importorskip("gpytorch")

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src"))


def run_client(code: str, timeout: int = 600) -> dict:
    """Run ``code`` with the switch on; it prints one JSON object, returned."""
    env = dict(os.environ, PYTHONPATH=SRC)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


GEOMLOSS = """
    import json, torch, lazymat
    # the one line: GeomLoss's `import pykeops` gives lazymat (force: even where the bench
    # extra installed the real pykeops)
    lazymat.install_as_pykeops(force=True)
    from geomloss import SamplesLoss
    assert lazymat.check_health(verbose=False)["pykeops"] == "lazymat"
    out = {}
    for dt in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(120, 3, generator=g, dtype=dt)
        y = torch.rand(90, 3, generator=g, dtype=dt) + 0.2
        a = torch.rand(120, generator=g, dtype=dt) + 0.5; a = a / a.sum()
        b = torch.rand(90, generator=g, dtype=dt) + 0.5; b = b / b.sum()
        cases = {
            "sinkhorn_p2": dict(loss="sinkhorn", p=2, blur=0.05),
            "sinkhorn_p1": dict(loss="sinkhorn", p=1, blur=0.05),
            "sinkhorn_p1_nodebias": dict(loss="sinkhorn", p=1, blur=0.05, debias=False),
            "gaussian": dict(loss="gaussian", blur=0.5),
            "laplacian": dict(loss="laplacian", blur=0.5),
            "energy": dict(loss="energy"),
            "multiscale_p2": dict(loss="sinkhorn", p=2, blur=0.05, scaling=0.95),
        }
        for name, kw in cases.items():
            res = {}
            for backend in ("tensorized", "multiscale" if name.startswith("multi") else "online"):
                xx = x.clone().requires_grad_()
                v = SamplesLoss(backend=backend, **kw)(a, xx, b, y)
                gx, = torch.autograd.grad(v, xx)
                res[backend] = (v.item(), gx)
            (v0, g0), (v1, g1) = res.values()
            out[f"{name}_{str(dt)[-7:]}"] = [abs(v1 - v0) / abs(v0),
                                            ((g1 - g0).abs().max() / g0.abs().max()).item()]
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def geomloss_results():
    return run_client(GEOMLOSS)


# relative errors (value, gradient) of the KeOps path against GeomLoss' tensorized one
GEOMLOSS_TOL = {
    # the same formulas: rounding only
    # the same formulas: rounding only (GeomLoss' tensorized |x|² - 2x·y + |y|² cancels, and
    # Sinkhorn divides the costs by blur^p)
    "sinkhorn_p2": (1e-5, 1e-4, 1e-8, 1e-6),
    "gaussian": (1e-5, 1e-4, 1e-10, 1e-8),
    "sinkhorn_p1_nodebias": (1e-5, 1e-4, 1e-8, 1e-6),
    # |x_i - x_i| is 0 online but sqrt(1e-8) = 1e-4 in GeomLoss' tensorized distances (its
    # clamp_min): the debiasing terms of distance-based costs differ by that much, with
    # pykeops too
    "sinkhorn_p1": (5e-3, 5e-3, 5e-3, 5e-3),
    "laplacian": (1e-3, 1e-4, 1e-3, 1e-8),
    "energy": (1e-3, 1e-4, 1e-3, 1e-8),
    # multiscale: GeomLoss' coarse-to-fine scheme ends on the same fixed point as the full
    # iterations when the epsilon-scaling is slow (scaling=0.95), up to its truncation
    "multiscale_p2": (2e-3, 2e-2, 2e-3, 2e-2),
}


@pytest.mark.parametrize("case", sorted(GEOMLOSS_TOL))
def test_geomloss_online_and_multiscale_match_tensorized(geomloss_results, case):
    f32v, f32g, f64v, f64g = GEOMLOSS_TOL[case]
    v32, g32 = geomloss_results[f"{case}_float32"]
    v64, g64 = geomloss_results[f"{case}_float64"]
    assert v32 < f32v and g32 < f32g, (v32, g32)
    assert v64 < f64v and g64 < f64g, (v64, g64)


GPYTORCH = """
    import json, torch, lazymat
    lazymat.install_as_pykeops(force=True)
    import gpytorch
    from gpytorch.kernels import keops
    dt = torch.float64
    g = torch.Generator().manual_seed(0)
    X = torch.rand(120, 2, generator=g, dtype=dt)
    Y = torch.sin(6 * X[:, 0]) + torch.cos(4 * X[:, 1]) + 0.1 * torch.randn(120, generator=g,
                                                                            dtype=dt)
    Xt = torch.rand(15, 2, generator=g, dtype=dt)

    class GP(gpytorch.models.ExactGP):
        def __init__(self, kernel, lik):
            super().__init__(X, Y, lik)
            self.mean = gpytorch.means.ConstantMean()
            self.cov = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean(x), self.cov(x))

    def train(kernel):
        torch.manual_seed(1)  # the same CG probe vectors for both kernels
        lik = gpytorch.likelihoods.GaussianLikelihood().to(dt)
        model = GP(kernel, lik).to(dt)
        model.train(); lik.train()
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
        losses = []
        # below max_cholesky_size GPyTorch would not call KeOps: 50 < 120 makes it use the
        # KeOps kernel (and CG) for the full matrix
        with gpytorch.settings.max_cholesky_size(50):
            for _ in range(3):
                opt.zero_grad()
                loss = -mll(model(X), Y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        model.eval(); lik.eval()
        # predictions by Cholesky from the hyperparameters each kernel trained (CG there would
        # need ~1000 iterations to agree to 1e-6 at this noise level)
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(1000):
            pred = lik(model(Xt)).mean
        return losses, pred

    out = {}
    pairs = {"rbf": (keops.RBFKernel, gpytorch.kernels.RBFKernel, {}),
             **{f"matern{nu}": (keops.MaternKernel, gpytorch.kernels.MaternKernel, {"nu": nu})
                for nu in (0.5, 1.5, 2.5)}}
    for name, (k_keops, k_dense, kw) in pairs.items():
        lk, pk = train(k_keops(**kw))
        ld, pd = train(k_dense(**kw))
        out[name] = [max(abs(u - v) for u, v in zip(lk, ld)), (pk - pd).abs().max().item(),
                     lk[0] - lk[-1]]
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def gpytorch_results():
    return run_client(GPYTORCH)


@pytest.mark.parametrize("kernel", ["rbf", "matern0.5", "matern1.5", "matern2.5"])
def test_gpytorch_keops_kernels_match_the_dense_ones(gpytorch_results, kernel):
    loss_diff, pred_diff, progress = gpytorch_results[kernel]
    assert progress > 0  # training made the loss go down
    assert loss_diff < 1e-6, loss_diff
    assert pred_diff < 1e-4, pred_diff
