"""Probe (2026-11-25): alternative forms of the depthwise backward against aten, 128x256x16x16 k5.
Run: python benchmarks/probes/depthwise_weight_grad_forms.py. Figures quoted in BENCHMARKS.md."""
import torch, time, torch.nn.functional as F, ctypes
libc = ctypes.CDLL("libc.so.6"); libc.mallopt(-4, 0); libc.mallopt(-1, 1<<30)  # M_MMAP_MAX=0, M_TRIM_THRESHOLD
torch.manual_seed(0)
N,C,H,W,k=128,256,16,16,5
x=torch.randn(N,C,H,W).contiguous(memory_format=torch.channels_last)
w=torch.randn(C,1,k,k)
g=torch.randn(N,C,H,W).contiguous(memory_format=torch.channels_last)
def t(f, n=5):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return sorted(ts)[n//2]*1e3
ref = torch.ops.aten.convolution_backward(g, x, w, [C], [1,1],[k//2,k//2],[1,1],False,[0,0],C,[True,True,True])
print("aten bwd all", t(lambda: torch.ops.aten.convolution_backward(g, x, w, [C], [1,1],[k//2,k//2],[1,1],False,[0,0],C,[True,True,True])))
print("aten wgrad only", t(lambda: torch.ops.aten.convolution_backward(g, x, w, [C], [1,1],[k//2,k//2],[1,1],False,[0,0],C,[False,True,False])))
print("fwd", t(lambda: F.conv2d(x,w,None,1,k//2,1,C)))
# grad input via flipped conv
gi = F.conv2d(g, w.flip(-1,-2), None, 1, k//2, 1, C)
print("gi err", (gi-ref[0]).abs().max().item(), t(lambda: F.conv2d(g, w.flip(-1,-2), None, 1, k//2, 1, C)))
# wgrad as grouped conv: input (1, C*N, Hp, Wp) weight g (C, N, H, W) groups=C
def wg1():
    xp = F.pad(x, (k//2,)*4)
    inp = xp.transpose(0,1).reshape(1, C*N, H+k-1, W+k-1)
    ker = g.transpose(0,1)
    return F.conv2d(inp, ker, None, 1, 0, 1, C).view(C,1,k,k)
r=wg1(); print("wg1 err", (r-ref[1]).abs().max().item()/ref[1].abs().max().item(), t(wg1))
# shifted products: einsum per offset using channels_last (N,H,W,C) views
def wg2():
    xp = F.pad(x, (k//2,)*4).permute(0,2,3,1)  # N,Hp,Wp,C
    gg = g.permute(0,2,3,1).reshape(-1, C)
    out = torch.empty(k,k,C)
    for i in range(k):
        for j in range(k):
            out[i,j] = (xp[:, i:i+H, j:j+W, :].reshape(-1, C) * gg).sum(0)
    return out.permute(2,0,1).unsqueeze(1)
r=wg2(); print("wg2 err", (r-ref[1]).abs().max().item()/ref[1].abs().max().item(), t(wg2))
# unfold along W only then matmul per row offset:  for each i: A = xp[:, i:i+H, :, :] (N,H,Wp,C); out[i,j,c] = sum_{n,h,w} A[n,h,w+j,c]*g[n,h,w,c]
def wg3():
    xp = F.pad(x, (k//2,)*4).permute(0,2,3,1)  # N,Hp,Wp,C contiguous? 
    gg = g.permute(0,2,3,1)
    xu = xp.unfold(2, W, 1)  # N,Hp,k,C,W
    out = torch.empty(k,k,C)
    for i in range(k):
        a = xu[:, i:i+H]  # N,H,k,C,W
        out[i] = torch.einsum('nhjcw,nhwc->jc', a, gg)
    return out.permute(2,0,1).unsqueeze(1)
r=wg3(); print("wg3 err", (r-ref[1]).abs().max().item()/ref[1].abs().max().item(), t(wg3))
xc, gc = x.contiguous(), g.contiguous()
print("aten wgrad NCHW", t(lambda: torch.ops.aten.convolution_backward(gc, xc, w, [C], [1,1],[k//2,k//2],[1,1],False,[0,0],C,[False,True,False])))
xb, gb, wb = x.bfloat16(), g.bfloat16(), w.bfloat16()
print("aten wgrad bf16 CL", t(lambda: torch.ops.aten.convolution_backward(gb, xb, wb, [C], [1,1],[k//2,k//2],[1,1],False,[0,0],C,[False,True,False])))
print("aten gi bf16 CL", t(lambda: torch.ops.aten.convolution_backward(gb, xb, wb, [C], [1,1],[k//2,k//2],[1,1],False,[0,0],C,[True,False,False])))
print("flip gi bf16", t(lambda: F.conv2d(gb, wb.flip(-1,-2), None, 1, k//2, 1, C)))
def wg4(x, g):
    xp = F.pad(x, (k//2,)*4)
    return torch.stack([ (xp[:, :, i:i+H, j:j+W] * g).sum((0,2,3)) for i in range(k) for j in range(k)], 1).view(C,1,k,k)
cw = torch.compile(wg4)
r=cw(x,g); print("wg4c err", (r-ref[1]).abs().max().item()/ref[1].abs().max().item(), t(lambda: cw(x,g)))
r=cw(xb,gb); print("wg4c bf16", t(lambda: cw(xb,gb)))
