import torch, time, sys
from torch.nn import functional as F
torch.set_num_threads(2)
R, D, B, S = 2_600_000, 16, 2048, 26
offsets = torch.arange(S) * 100_000
def make_grad():
    rows = (torch.randint(0, 100_000, (B, S)) + offsets).flatten()
    vals = torch.randn(B * S, D)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), vals, (R, D), check_invariants=False)
w = torch.zeros(R, D); state = torch.zeros(R)
def apply(rows, vals, lr=0.01, eps=1e-8, write="index_add"):
    if write == "index_add":
        state.index_add_(0, rows, vals.pow(2).mean(1))
        scale = state.index_select(0, rows).sqrt_().add_(eps).reciprocal_().mul_(-lr)
        w.index_add_(0, rows, vals * scale.unsqueeze(1))
    else:
        s = state.index_select(0, rows).add_(vals.pow(2).mean(1))
        state.index_copy_(0, rows, s) if write == "index_copy" else state.index_put_((rows,), s)
        new = w.index_select(0, rows).addcmul_(vals, s.sqrt_().add_(eps).reciprocal_().mul_(-lr).unsqueeze(1))
        w.index_copy_(0, rows, new) if write == "index_copy" else w.index_put_((rows,), new)
def dedup_coalesce(g):
    g = g.coalesce(); return g.indices()[0], g.values()
def dedup_unique_bag(g):
    idx, vals = g._indices()[0], g._values()
    srt, order = torch.sort(idx)
    rows, counts = torch.unique_consecutive(srt, return_counts=True)
    starts = torch.zeros_like(counts); torch.cumsum(counts[:-1], 0, out=starts[1:])
    return rows, F.embedding_bag(order, vals, starts, mode="sum")
def dedup_unique_scatter(g):
    idx, vals = g._indices()[0], g._values()
    rows, inv = torch.unique(idx, return_inverse=True)
    return rows, torch.zeros(rows.shape[0], D).scatter_add_(0, inv.unsqueeze(1).expand(-1, D), vals)
def dedup_unique_indexadd(g):
    idx, vals = g._indices()[0], g._values()
    rows, inv = torch.unique(idx, return_inverse=True)
    return rows, torch.zeros(rows.shape[0], D).index_add_(0, inv, vals)
grads = [make_grad() for _ in range(6)]
variants = {
 "coalesce+index_add": lambda g: apply(*dedup_coalesce(g)),
 "coalesce+index_put": lambda g: apply(*dedup_coalesce(g), write="index_put"),
 "bag+index_put": lambda g: apply(*dedup_unique_bag(g), write="index_put"),
 "bag+index_copy": lambda g: apply(*dedup_unique_bag(g), write="index_copy"),
 "uscatter+index_put": lambda g: apply(*dedup_unique_scatter(g), write="index_put"),
 "uindexadd+index_put": lambda g: apply(*dedup_unique_indexadd(g), write="index_put"),
 "sgd_add_": lambda g: w.add_(g, alpha=-0.01),
}
# correctness of dedups
r1,v1=dedup_coalesce(grads[0]); r2,v2=dedup_unique_bag(grads[0]); r3,v3=dedup_unique_scatter(grads[0])
print("dedup equal", torch.equal(r1,r2), (v1-v2).abs().max().item(), (v1-v3).abs().max().item())
for rep in range(2):
  for name, fn in variants.items():
    for g in grads[:2]: fn(g)
    t = time.perf_counter()
    for i in range(20): fn(grads[i % 6])
    print(f"{name:22s} {(time.perf_counter()-t)/20*1000:.2f} ms")
g=grads[0]; idx=g._indices()[0]; vals=g._values(); srt,order=torch.sort(idx)
for name, fn in [("sort", lambda: torch.sort(idx)), ("unique_inv", lambda: torch.unique(idx, return_inverse=True)), ("index_add_w", lambda: w.index_add_(0, idx, vals)), ("index_select", lambda: w.index_select(0, idx)), ("index_put", lambda: w.index_put_((srt,), vals)), ("index_copy", lambda: w.index_copy_(0, srt, vals)), ("embedding_bag", lambda: F.embedding_bag(order, vals, torch.arange(0, len(idx), 2), mode="sum"))]:
    fn(); t=time.perf_counter()
    for i in range(20): fn()
    print(f"{name:14s} {(time.perf_counter()-t)/20*1000:.2f} ms")
