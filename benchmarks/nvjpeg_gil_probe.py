"""Probe 2: where the direct decoder's per-batch time goes, CDLL (GIL released per call) vs PyDLL
(GIL kept), idle and with a busy Python thread beside (GIL contention, as in the server)."""
import ctypes, json, statistics, sys, threading, time
sys.path.insert(0, ".")
import torch
from loadtest._payloads import photo_set
from model_server import nvjpeg, tuning

dev = torch.device("cuda")
torch.zeros(1, device=dev)
dec = nvjpeg.hardware_decoder(dev)
path = nvjpeg._library_path()
C = dec.lib
Py = ctypes.PyDLL(path); nvjpeg._bind(Py)
N = 128
jpegs = [p.jpeg for p in photo_set("vga")]
enc = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (jpegs * 40)[:N]]
h = dec.handle
ch, sub, sup = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
W, H = (ctypes.c_int * 4)(), (ctypes.c_int * 4)()
def info(lib):
    for e in enc: lib.nvjpegGetImageInfo(h, e.data_ptr(), e.numel(), ctypes.byref(ch), ctypes.byref(sub), W, H)
def parse(lib):
    for e in enc: lib.nvjpegJpegStreamParseHeader(h, e.data_ptr(), e.numel(), dec.parsed)
def supported(lib):
    for e in enc:
        lib.nvjpegJpegStreamParseHeader(h, e.data_ptr(), e.numel(), dec.parsed)
        lib.nvjpegDecodeBatchedSupported(h, dec.parsed, ctypes.byref(sup))
def fill():
    images = (nvjpeg._Image * N)()
    for j in range(N):
        for c in range(3):
            images[j].channel[c] = 1000 + j; images[j].pitch[c] = 640
def whole():
    dec.decode(enc); torch.cuda.current_stream().synchronize()
def tv():
    from model_server.preprocess import decode_jpegs
    decode_jpegs(enc, dev); torch.cuda.current_stream().synchronize()
def med(fn, reps=15):
    fn(); v = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); v.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(v), 3)
res = {}
stop = threading.Event()
def busy():
    x = 0
    while not stop.is_set(): x += 1
for state in ("idle", "busy_thread"):
    t = None
    if state == "busy_thread":
        t = threading.Thread(target=busy, daemon=True); t.start()
    for name, fn in [("info_cdll", lambda: info(C)), ("info_pydll", lambda: info(Py)), ("parse_pydll", lambda: parse(Py)),
                     ("parse_cdll", lambda: parse(C)), ("parse_supported_pydll", lambda: supported(Py)),
                     ("fill_structs", fill), ("decoder_decode", whole), ("torchvision_decode", tv)]:
        res[f"{state}_{name}_ms"] = med(fn)
    if t is not None:
        stop.set(); t.join()
print(json.dumps(res, indent=1))
