import torch, time, sys
torch.set_num_threads(2)
R, D, B, S = 2_600_000, 16, 2048, 26
offsets = torch.arange(S) * 100_000
def make_grad():
    rows = (torch.randint(0, 100_000, (B, S)) + offsets).flatten()
    vals = torch.randn(B * S, D)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), vals, (R, D))
w = torch.zeros(R, D); state = torch.zeros(R)
marker = torch.full((R,), -1, dtype=torch.int64)
def coalesce_step(g, lr=0.01, eps=1e-8):
    g = g.coalesce(); rows, vals = g.indices()[0], g.values()
    state.index_add_(0, rows, vals.pow(2).mean(1))
    scale = state.index_select(0, rows).sqrt_().add_(eps).reciprocal_().mul_(-lr)
    w.index_add_(0, rows, vals * scale.unsqueeze(1))
def unique_step(g, lr=0.01, eps=1e-8):
    rows, inv = torch.unique(g._indices()[0], return_inverse=True)
    vals = torch.zeros(rows.shape[0], D).index_add_(0, inv, g._values())
    state.index_add_(0, rows, vals.pow(2).mean(1))
    scale = state.index_select(0, rows).sqrt_().add_(eps).reciprocal_().mul_(-lr)
    w.index_add_(0, rows, vals * scale.unsqueeze(1))
def marker_step(g, lr=0.01, eps=1e-8):
    idx = g._indices()[0]
    marker.index_fill_(0, idx, 0)
    rows = torch.nonzero(marker == 0).squeeze(1)  # full scan
    marker.index_copy_(0, rows, torch.arange(rows.shape[0]))
    inv = marker.index_select(0, idx)
    marker.index_fill_(0, rows, -1)
    vals = torch.zeros(rows.shape[0], D).index_add_(0, inv, g._values())
    state.index_add_(0, rows, vals.pow(2).mean(1))
    scale = state.index_select(0, rows).sqrt_().add_(eps).reciprocal_().mul_(-lr)
    w.index_add_(0, rows, vals * scale.unsqueeze(1))
def sortonly_step(g, lr=0.01, eps=1e-8):
    idx = g._indices()[0]
    srt, order = torch.sort(idx)
    first = torch.ones_like(srt, dtype=torch.bool); first[1:] = srt[1:] != srt[:-1]
    inv_sorted = torch.cumsum(first, 0) - 1
    rows = srt[first]
    inv = torch.empty_like(inv_sorted).index_copy_(0, order, inv_sorted)
    vals = torch.zeros(rows.shape[0], D).index_add_(0, inv, g._values())
    state.index_add_(0, rows, vals.pow(2).mean(1))
    scale = state.index_select(0, rows).sqrt_().add_(eps).reciprocal_().mul_(-lr)
    w.index_add_(0, rows, vals * scale.unsqueeze(1))
def nodedup_step(g, lr=0.01, eps=1e-8):
    rows, vals = g._indices()[0], g._values()
    state.index_add_(0, rows, vals.pow(2).mean(1))
    scale = state.index_select(0, rows).sqrt_().add_(eps).reciprocal_().mul_(-lr)
    w.index_add_(0, rows, vals * scale.unsqueeze(1))
def sgd_step(g, lr=0.01):
    w.add_(g, alpha=-lr)
grads = [make_grad() for _ in range(6)]
for rep in range(2):
  for name, fn in [("coalesce", coalesce_step), ("unique", unique_step), ("marker", marker_step), ("sort", sortonly_step), ("nodedup", nodedup_step), ("sgd", sgd_step)]:
    for g in grads[:2]: fn(g)
    t = time.perf_counter()
    for i in range(20): fn(grads[i % 6])
    print(f"{name:10s} {(time.perf_counter()-t)/20*1000:.2f} ms")
# parts
g=grads[0]; idx=g._indices()[0]
for name, fn in [("sort53k", lambda: torch.sort(idx)), ("index_add_w", lambda: w.index_add_(0, idx, g._values())), ("index_select", lambda: w.index_select(0, idx)), ("index_put", lambda: w.index_put_((idx,), g._values())), ("nonzero2.6M", lambda: torch.nonzero(marker==0))]:
    fn(); t=time.perf_counter()
    for i in range(20): fn()
    print(f"{name:12s} {(time.perf_counter()-t)/20*1000:.2f} ms")
