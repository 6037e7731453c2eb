import torch, time, sys
torch.set_num_threads(2)
B,F,D=2048,26,16
V=F+1
r,c=torch.triu_indices(V,V,offset=1); flat=r*V+c
x0=torch.randn(B,V,D)
def A(x):
    g=torch.bmm(x,x.transpose(1,2)); return g.flatten(1).index_select(1,flat)
def C(x):
    g=torch.bmm(x,x.transpose(1,2)); return g[:,r,c]
def E(x):
    return (x.index_select(1,r)*x.index_select(1,c)).sum(-1)
def G(x):
    g=torch.bmm(x,x.transpose(1,2)); return torch.gather(g.flatten(1),1,flat.expand(B,-1))
for name,fn in [("A",A),("C",C),("E",E),("G",G)]*2:
    x=x0.clone().requires_grad_()
    for _ in range(3): fn(x).sum().backward()
    t=time.perf_counter()
    for _ in range(20):
        y=fn(x); y.backward(torch.ones_like(y))
    print(name, (time.perf_counter()-t)/20*1000, "ms fwd+bwd")
