import sys, ctypes, time, torch
if "mallopt" in sys.argv:
    libc = ctypes.CDLL("libc.so.6")
    print("mallopt", libc.mallopt(-3, 1 << 30), libc.mallopt(-1, 1 << 31))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
from training.bench_training import kaggle_model, random_batches
from training.optim import build_optimizer, train_step
torch.set_num_threads(2)
bf16 = "bf16" in sys.argv
name = next((a for a in sys.argv if a in ("rowwise_adagrad","sgd","sparse_adam")), "rowwise_adagrad")
for B in (128, 2048):
    m = kaggle_model(); opt = build_optimizer(m, lr=1e-3, embedding_lr=0.02, name=name)
    batches = random_batches(B)
    def step(b):
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return train_step(m, opt, *b)
        return train_step(m, opt, *b)
    for i in range(5): step(batches[i % 8])
    n = 20 if B > 1000 else 100
    t = time.perf_counter()
    for i in range(n): step(batches[i % 8])
    dt = time.perf_counter() - t
    print(sys.argv[1:], B, f"{n*B/dt:,.0f} samples/s {dt/n*1000:.1f} ms")
