"""A spoken-digit data set synthesised on the spot with Debian's espeak-ng and flite.

Ten classes ("zero" ... "nine"). A *voice* is an espeak-ng accent with a voice variant
(``en-gb-scotland+m3``) or a flite voice (``flite:awb``). Each clip draws a voice from its
split, a speaking rate and (espeak-ng) a pitch, then gets random leading silence, a random gain
and background noise at a random SNR. The test split uses only *held-out* voices: variants and
flite voices that no training clip uses, so accuracy on it measures generalisation to new
speakers. Clips are written as 16 kHz mono 16-bit WAV under ``out/{train,test}/<digit>/``,
which is the folder layout ``unipred.tasks.audio.data.list_audio`` reads.

Everything is drawn from ``seed``, so a data set is identical on every run; a finished set is
found again by its ``manifest.json`` and not re-synthesised.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import tempfile
import wave
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
           "en-gb-x-gbcwmd", "en-029", "en-us-nyc")  # fmt: skip
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m7", "f1", "f3", "f4", "klatt", "Andy", "grandma")
TEST_VARIANTS = ("m6", "f2", "f5", "Annie")  # never heard in training
TRAIN_FLITE = ("kal16", "awb")
TEST_FLITE = ("slt", "rms")
SAMPLE_RATE = 16000
_VERSION = 3  # bump when the synthesis recipe changes, so cached sets are rebuilt


def available_engines() -> list[str]:
    """The synthesisers found on PATH ("espeak-ng", "flite")."""
    return [e for e in ("espeak-ng", "flite") if shutil.which(e)]


def voices(split: str, engines: list[str] | None = None) -> list[str]:
    """Voice names of a split ("train" or "test") for the engines present."""
    engines = available_engines() if engines is None else engines
    variants, flite = (
        (TRAIN_VARIANTS, TRAIN_FLITE) if split == "train" else (TEST_VARIANTS, TEST_FLITE)
    )
    out = []
    if "espeak-ng" in engines:
        out += [f"{a}+{v}" for a in ACCENTS for v in variants]
    if "flite" in engines:
        out += [f"flite:{v}" for v in flite]
    return out


def voice_index(i: int, label: int, n_voices: int) -> int:
    """The voice of clip ``i`` of a digit: every digit cycles through *all* voices (from its own
    offset), so a voice never predicts the label. (The old ``(i * 10 + label) % n`` gave each
    digit only n / gcd(n, 10) voices: 9 of the 90 training voices, so a classifier could name
    the digit from the speaker.)"""
    return (i + label * (n_voices // len(DIGITS) + 1)) % n_voices


def clip_seed(seed: int, split: str, label: int, i: int) -> int:
    """The random seed of one clip. crc32, not ``hash()``: Python salts the hash of strings
    per process (PYTHONHASHSEED), which made every synthesis run draw different clips."""
    return zlib.crc32(f"{seed}/{split}/{label}/{i}".encode())


def _synth_cmd(voice: str, text: str, path: str, rng: random.Random) -> list[str]:
    """The command line that speaks ``text`` with ``voice`` at a random rate (and pitch)."""
    if voice.startswith("flite:"):
        stretch = rng.uniform(0.8, 1.35)  # > 1 is slower
        return ["flite", "-voice", voice[6:], "-t", text, "-o", path,
                "--setf", f"duration_stretch={stretch:.3f}"]  # fmt: skip
    speed, pitch = rng.randint(110, 220), rng.randint(20, 80)
    return ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, text]


def _read_wav(path: str) -> tuple[torch.Tensor, int]:
    with wave.open(path, "rb") as w:
        sr, n, width = w.getframerate(), w.getnframes(), w.getsampwidth()
        raw = w.readframes(n)
    if width != 2:
        raise ValueError(f"{path}: expected 16-bit PCM, got {8 * width}-bit")
    x = torch.frombuffer(bytearray(raw), dtype=torch.int16).float() / 32768
    return x.view(-1, w.getnchannels()).mean(dim=1), sr


def write_wav(path: str | Path, x: torch.Tensor, sr: int = SAMPLE_RATE) -> None:
    """Mono float waveform in [-1, 1] -> 16-bit PCM WAV."""
    pcm = (x.clamp(-1, 1) * 32767).round().to(torch.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes(pcm.numpy().tobytes())


def _degrade(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Random leading silence (0-0.3 s), gain (-10..0 dB) and white noise at 10-35 dB SNR."""
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    x = torch.cat([torch.zeros(int(rng.uniform(0, 0.3) * SAMPLE_RATE)), x])
    x = x / x.abs().max().clamp_min(1e-4) * 0.9 * 10 ** (rng.uniform(-10, 0) / 20)
    snr_db = rng.uniform(10, 35)
    noise_rms = x.pow(2).mean().sqrt() / 10 ** (snr_db / 20)
    return x + noise_rms * torch.randn(x.shape, generator=g)


def _make_clip(job: tuple) -> str | None:
    """Synthesise one clip; returns an error message, or None on success."""
    voice, label, path, seed = job
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        raw = str(Path(tmp) / "raw.wav")
        cmd = _synth_cmd(voice, DIGITS[label], raw, rng)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode != 0 or not Path(raw).is_file():
            return f"{' '.join(cmd)}: {res.stderr.strip()[:200]}"
        x, sr = _read_wav(raw)
    from unipred.tasks.audio.data import resample  # late: keeps this module light to import

    x = resample(x, sr, SAMPLE_RATE)
    write_wav(path, _degrade(x, rng))
    return None


def synthesize(out: str | Path, train_per_class: int = 200, test_per_class: int = 40,
               seed: int = 0, workers: int = 2, engines: list[str] | None = None) -> Path:  # fmt: skip
    """Create (or find) the data set in ``out``; returns ``out``. Needs espeak-ng and/or flite.

    Per split, clips cycle over the split's voices so every voice speaks every digit about
    equally often.
    """
    out = Path(out)
    engines = available_engines() if engines is None else engines
    if not engines:
        raise RuntimeError(
            "spoken digits need espeak-ng or flite: apt-get install -y espeak-ng flite"
        )
    spec = {"version": _VERSION, "train_per_class": train_per_class,
            "test_per_class": test_per_class, "seed": seed, "engines": sorted(engines)}  # fmt: skip
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("spec") == spec:
        return out
    if out.exists():
        shutil.rmtree(out)
    jobs = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        vs = voices(split, engines)
        random.Random(seed + len(split)).shuffle(vs)
        for label in range(len(DIGITS)):
            (out / split / DIGITS[label]).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                v = vs[voice_index(i, label, len(vs))]
                name = f"{v.replace(':', '-').replace('+', '_')}_{i:04d}.wav"
                jobs.append((v, label, str(out / split / DIGITS[label] / name),
                             clip_seed(seed, split, label, i)))  # fmt: skip
    with ThreadPoolExecutor(max(1, workers)) as pool:  # the synthesisers are subprocesses
        errors = [e for e in pool.map(_make_clip, jobs) if e]
    if len(errors) > len(jobs) // 10:
        raise RuntimeError(f"{len(errors)} of {len(jobs)} clips failed, e.g. {errors[0]}")
    counts = {s: sum(1 for _ in (out / s).rglob("*.wav")) for s in ("train", "test")}
    manifest.write_text(json.dumps({"spec": spec, "counts": counts, "failed": len(errors),
                                    "train_voices": voices("train", engines),
                                    "test_voices": voices("test", engines)}, indent=1))  # fmt: skip
    return out


def tone_digit(label: int, seed: int, seconds: float = 0.8) -> torch.Tensor:
    """A stand-in "digit" when no synthesiser exists (smoke runs only): three tones whose
    pitches spell the label in base 3, with random base pitch, timing and noise."""
    g = torch.Generator().manual_seed(seed)
    base = 200 + 200 * float(torch.rand((), generator=g))
    n = int(seconds * SAMPLE_RATE)
    t = torch.arange(n) / SAMPLE_RATE
    x = torch.zeros(n)
    for k, d in enumerate((label // 9 % 3, label // 3 % 3, label % 3)):
        seg = (t >= k * seconds / 3) & (t < (k + 1) * seconds / 3)
        x = x + seg * torch.sin(2 * math.pi * base * 2 ** (d * 0.5) * t)
    return 0.3 * x + 0.02 * torch.randn(n, generator=g)
