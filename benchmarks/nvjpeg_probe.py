"""Probe: is nvjpegDecodeBatched (hardware backend) asynchronous to the host, and does a pipelined
loop (two states, no host sync per batch) decode more per second than torchvision's call?"""
import ctypes, glob, json, statistics, sys, time
from pathlib import Path
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
import torch, torchvision
from loadtest._payloads import photo_set
from decode_bench import ModelLoad
from model_server.preprocess import image_ops

dev = torch.device("cuda")
libpath = sorted(glob.glob(str(Path(torchvision.__file__).parent.parent / "torchvision.libs" / "libnvjpeg*.so*")))[0]
lib = ctypes.CDLL(libpath)
P, I, U, SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
IP = ctypes.POINTER(ctypes.c_int)
class Img(ctypes.Structure):
    _fields_ = [("channel", ctypes.c_void_p * 4), ("pitch", ctypes.c_size_t * 4)]
for name, args in {"nvjpegCreateEx": [I, P, P, U, ctypes.POINTER(P)], "nvjpegJpegStateCreate": [P, ctypes.POINTER(P)],
    "nvjpegGetImageInfo": [P, P, SZ, IP, IP, IP, IP], "nvjpegDecodeBatchedInitialize": [P, P, I, I, I],
    "nvjpegDecodeBatched": [P, P, ctypes.POINTER(P), ctypes.POINTER(SZ), ctypes.POINTER(Img), P]}.items():
    f = getattr(lib, name); f.argtypes, f.restype = args, ctypes.c_int
def ck(s, what):
    if s != 0: raise RuntimeError(f"{what}: {s}")
h = P(); ck(lib.nvjpegCreateEx(3, None, None, 0, ctypes.byref(h)), "create")
states = [P(), P(), P()]
for s in states: ck(lib.nvjpegJpegStateCreate(h, ctypes.byref(s)), "state")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 128
jpegs = [p.jpeg for p in photo_set("vga")]
batch = (jpegs * (N // len(jpegs) + 1))[:N]
enc = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch]
ptrs = (ctypes.c_void_p * N)(*[e.data_ptr() for e in enc]); lens = (ctypes.c_size_t * N)(*[e.numel() for e in enc])
ch, sub = ctypes.c_int(), ctypes.c_int(); W, H = (ctypes.c_int * 4)(), (ctypes.c_int * 4)()
def infos():
    out = []
    for e in enc:
        ck(lib.nvjpegGetImageInfo(h, e.data_ptr(), e.numel(), ctypes.byref(ch), ctypes.byref(sub), W, H), "info")
        out.append((H[0], W[0]))
    return out
dims = infos()
def make_out():
    ts = [torch.empty((3, hh, ww), dtype=torch.uint8, device=dev) for hh, ww in dims]
    imgs = (Img * N)()
    for j, t in enumerate(ts):
        for c in range(3):
            imgs[j].channel[c] = t.data_ptr() + c * dims[j][0] * dims[j][1]; imgs[j].pitch[c] = dims[j][1]
    return ts, imgs
outs = [make_out() for _ in states]
stream = torch.cuda.Stream(dev)
def submit(k, per_image_info=True):
    if per_image_info: infos()
    ck(lib.nvjpegDecodeBatchedInitialize(h, states[k], N, 1, 3), "init")
    ck(lib.nvjpegDecodeBatched(h, states[k], ptrs, lens, outs[k][1], ctypes.c_void_p(stream.cuda_stream)), "decode")
res = {"batch": N, "lib": libpath}
# correctness vs torchvision
ops = image_ops()
ref = ops.decode_jpegs_cuda(enc, 3, dev)
submit(0); stream.synchronize()
res["max_abs_diff_vs_torchvision"] = max(int((a.int() - b.int()).abs().max()) for a, b in zip(ref, outs[0][0]))
def timed(fn, reps=15):
    v = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); v.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(v), 3)
def phase(tag):
    torch.cuda.synchronize()
    # host time of the call alone (then sync outside the timing)
    v = []
    for _ in range(15):
        t0 = time.perf_counter(); submit(0); t1 = time.perf_counter(); stream.synchronize(); t2 = time.perf_counter()
        v.append(((t1 - t0) * 1000, (t2 - t0) * 1000))
    res[f"{tag}_call_returns_ms"] = round(statistics.median(a for a, _ in v), 3)
    res[f"{tag}_call_plus_sync_ms"] = round(statistics.median(b for _, b in v), 3)
    res[f"{tag}_torchvision_ms"] = timed(lambda: ops.decode_jpegs_cuda(enc, 3, dev))
    # pipelined: states round robin, an event per batch, wait only for the batch that used this state before
    for depth in (1, 2, 3):
        evs = [None] * len(states)
        reps = 60
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for i in range(reps):
            k = i % depth
            if evs[k] is not None: evs[k].synchronize()
            submit(k)
            e = torch.cuda.Event(); e.record(stream); evs[k] = e
        stream.synchronize()
        res[f"{tag}_pipelined_depth{depth}_img_s"] = round(reps * N / (time.perf_counter() - t0), 1)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for i in range(60): ops.decode_jpegs_cuda(enc, 3, dev)
    res[f"{tag}_torchvision_loop_img_s"] = round(60 * N / (time.perf_counter() - t0), 1)
phase("idle")
load = ModelLoad(dev, "side-graph")
with load:
    phase("beside_model")
res["model_replays_per_s"] = load.replays_per_s
print(json.dumps(res, indent=1))
