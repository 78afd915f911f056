"""Audio tokenizers: log-mel spectrogram patches ("audio") and raw-waveform frames ("audio_frames").

Both take a mono waveform batch in one of these forms (what ``model(x)`` receives):

* a tensor (B, S) or (B, 1, S): every sample is real;
* a dict ``{"wave": (B, S), "lengths": (B,), "sample_rate": int (optional)}``;
* a tuple ``(wave, lengths)``.

Clips of different lengths are zero-padded to S; ``lengths`` says how many samples of each row
are real. A token is valid only when everything it is computed from lies inside the real part
(no centre padding in the STFT, partial patches dropped), so a clip's valid tokens are
bit-for-bit the same whether it is alone or padded in a batch with a longer one.

Time coordinates are absolute: seconds mapped so that ``time_span`` seconds cover [-1, 1]. A
clip's coordinates therefore never depend on the length of the other clips in its batch.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from unipred.base.extras import require
from unipred.base.registry import TOKENIZERS
from unipred.base.tokens import Tokens


def _torchaudio():
    # imported when an audio tokenizer is used, never by the image path (see unipred.base.extras)
    return require("torchaudio", "audio", "the audio tokenizer")


def split_audio_input(x) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Any accepted input form -> (wave (B, S) float, lengths (B,) long, sample_rate | None)."""
    sr = None
    if isinstance(x, dict):
        if "wave" not in x:
            raise ValueError(f"audio input dict needs a 'wave' key, got keys {sorted(x)}")
        wave, lengths, sr = x["wave"], x.get("lengths"), x.get("sample_rate")
    elif isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"audio input tuple must be (wave, lengths), got {len(x)} items")
        wave, lengths = x
    else:
        wave, lengths = x, None
    if wave.dim() == 3 and wave.shape[1] == 1:
        wave = wave[:, 0]  # (B, 1, S) -> (B, S)
    if wave.dim() != 2:
        raise ValueError(f"audio tokenizers expect a mono (B, S) waveform, got {tuple(wave.shape)}")
    B, S = wave.shape
    if lengths is None:
        lengths = torch.full((B,), S, dtype=torch.long, device=wave.device)
    lengths = torch.as_tensor(lengths, device=wave.device).long()
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be (B,) = ({B},), got {tuple(lengths.shape)}")
    if bool((lengths > S).any()) or bool((lengths < 0).any()):
        raise ValueError(f"lengths must lie in [0, {S}], got {lengths.tolist()}")
    return wave.float(), lengths, None if sr is None else int(sr)


def resample_batch(wave, lengths, orig_sr: int, new_sr: int):
    """Resample a padded batch; lengths scale with the rate. Exact padding invariance needs
    per-clip resampling (the data readers do that), here the filter may touch the padding."""
    if orig_sr == new_sr:
        return wave, lengths
    out = _torchaudio().functional.resample(wave, orig_sr, new_sr)
    new_len = torch.ceil(lengths.double() * new_sr / orig_sr).long().clamp_max(out.shape[-1])
    return out, new_len


def time_coords(n: int, seconds_per_step: float, time_span: float, device) -> torch.Tensor:
    """Centres of n consecutive steps, in seconds, mapped so that ``time_span`` s is [-1, 1]."""
    t = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) * seconds_per_step
    return 2.0 * t / time_span - 1.0


def example_clips(batch_size: int, sample_rate: int) -> dict:
    """Clips of different lengths (one second, the rest padded half-length), for tests."""
    lengths = torch.tensor([sample_rate] + [sample_rate // 2] * (batch_size - 1))
    return {"wave": 0.1 * torch.randn(batch_size, sample_rate), "lengths": lengths}


def waves_at_rate(x, sample_rate: int):
    """Any accepted audio input -> (wave (B, S), lengths (B,)) at ``sample_rate``."""
    wave, lengths, sr = split_audio_input(x)
    if sr is not None and sr != sample_rate:
        wave, lengths = resample_batch(wave, lengths, sr, sample_rate)
    return wave, lengths


CLIP_NORMS = ("none", "clip", "cmvn")


@TOKENIZERS.register("audio")
class AudioSpectrogramTokenizer(nn.Module):
    """Waveform -> normalised log-mel (B, 1, frames, n_mels) -> (pt x pf) patches, time-major.

    Tokens are ordered time step by time step (all frequency patches of one time step, low to
    high, then the next step), so "next" means later in time. Coordinates are (time, freq).
    """

    coord_dims = 2

    def __init__(
        self,
        dim: int = 768,
        sample_rate: int = 16000,
        n_mels: int = 128,
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
        n_fft: int | None = None,  # None: the smallest power of two >= the window that
        #                            leaves no mel filter empty (1024 for the defaults)
        f_min: float = 0.0,
        f_max: float | None = None,
        patch_size: int | tuple[int, int] = 16,  # (time frames, mel bins)
        mean: float = 0.0,  # dataset statistics of the log-mel values (pack-audio prints them)
        std: float = 1.0,
        time_span: float = 10.24,  # seconds that map onto the time coordinate range [-1, 1]
        # per-clip normalisation of the log-mel after the dataset statistics, over the clip's
        # real frames (padding excluded): "none"; "clip" one mean and std per clip (its level:
        # voice loudness, gain); "cmvn" each mel bin's own mean and std per clip (cepstral mean
        # and variance normalisation, the speech standard: also the voice's average spectrum)
        clip_norm: str = "none",
    ):
        super().__init__()
        if clip_norm not in CLIP_NORMS:
            raise ValueError(f"audio tokenizer clip_norm={clip_norm!r}: use one of {CLIP_NORMS}")
        self.clip_norm = clip_norm
        pt, pf = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if n_mels % pf:
            raise ValueError(f"n_mels {n_mels} is not divisible by the frequency patch size {pf}")
        if std <= 0:
            raise ValueError(f"audio tokenizer std must be > 0, got {std}")
        self.dim, self.sample_rate, self.n_mels = dim, sample_rate, n_mels
        self.patch_t, self.patch_f, self.mean, self.std = pt, pf, float(mean), float(std)
        self.win = round(sample_rate * win_ms / 1000)
        self.hop = round(sample_rate * hop_ms / 1000)
        self.time_span = time_span
        n_fft = n_fft or default_n_fft(self.win, sample_rate, n_mels, f_min, f_max)
        if n_fft < self.win:
            raise ValueError(f"n_fft {n_fft} is shorter than the {self.win}-sample window")
        self.n_fft = n_fft
        # center=False: frame i covers samples [i*hop, i*hop + win), so frames inside the real
        # part of a clip never see padding (centre padding would reflect it in)
        self.mel = _torchaudio().transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=self.win, hop_length=self.hop,
            f_min=f_min, f_max=f_max, n_mels=n_mels, center=False, power=2.0,
        )  # fmt: skip
        _make_buffers_non_persistent(self.mel)  # fixed tables, not weights: keep out of ckpts
        self.proj = nn.Conv2d(1, dim, kernel_size=(pt, pf), stride=(pt, pf))

    def n_frames(self, n_samples: torch.Tensor | int):
        """STFT frames computed entirely from the first n_samples samples."""
        n = torch.as_tensor(n_samples)
        return torch.where(n >= self.win, (n - self.win) // self.hop + 1, torch.zeros_like(n))

    def spectrogram(self, wave: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) waveform -> (B, frames, n_mels) normalised log-mel, computed in float32;
        ``lengths`` (B,) real samples per clip, for ``clip_norm`` (None: all of it)."""
        self.mel.float()  # the tables stay float32 even in a bf16 model
        # torch.stft centres the win-long window inside each n_fft-long frame; padding by the
        # difference makes frame i cover exactly samples [i*hop, i*hop + win)
        left = (self.n_fft - self.win) // 2
        wave = F.pad(wave.float(), (left, self.n_fft - self.win - left))
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = self.mel(wave)  # (B, n_mels, frames)
        spec = torch.log(spec + 1e-6).transpose(1, 2)  # (B, frames, n_mels)
        spec = (spec - self.mean) / self.std
        if self.clip_norm != "none":
            spec = self._clip_normalise(spec, lengths)
        return spec

    def _clip_normalise(self, spec: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """Per-clip standardisation of (B, frames, n_mels) over each clip's real frames (all
        of them for a clip shorter than one frame); padded frames are scaled alike."""
        B, T, _ = spec.shape
        n = torch.full((B,), T, device=spec.device) if lengths is None else self.n_frames(lengths)
        n = n.to(spec.device).clamp(1, T)
        w = (torch.arange(T, device=spec.device)[None, :] < n[:, None]).to(spec.dtype)[..., None]
        dims = (1, 2) if self.clip_norm == "clip" else (1,)
        count = w.sum(1, keepdim=True) * (spec.shape[2] if self.clip_norm == "clip" else 1)
        mean = (spec * w).sum(dims, keepdim=True) / count
        var = ((spec - mean) ** 2 * w).sum(dims, keepdim=True) / count
        return (spec - mean) / var.sqrt().clamp_min(1e-3)

    def example_input(self, batch_size: int = 2) -> dict:
        return example_clips(batch_size, self.sample_rate)

    @property
    def patch_dim(self) -> int:
        """Values per raw patch (``patches``): time frames x mel bins."""
        return self.patch_t * self.patch_f

    def patches(self, x) -> torch.Tensor:
        """Any accepted input -> normalised log-mel patches (B, N, pt*pf) in token order
        (time-major; within a patch, frames then mel bins)."""
        wave, lengths = waves_at_rate(x, self.sample_rate)
        spec = self._patched_spectrogram(wave, lengths)  # (B, n_t*pt, n_mels)
        B, pt, pf = spec.shape[0], self.patch_t, self.patch_f
        n_t, n_f = spec.shape[1] // pt, self.n_mels // pf
        spec = spec.reshape(B, n_t, pt, n_f, pf).permute(0, 1, 3, 2, 4)  # (B, n_t, n_f, pt, pf)
        return spec.reshape(B, n_t * n_f, pt * pf)

    def _patched_spectrogram(self, wave: torch.Tensor, lengths=None) -> torch.Tensor:
        """(B, S) -> (B, n_t * pt, n_mels): the log-mel frames that make whole patches."""
        n_t = int(self.n_frames(wave.shape[1])) // self.patch_t
        if n_t < 1:
            need = self.win + (self.patch_t - 1) * self.hop
            raise ValueError(
                f"audio of {wave.shape[1]} samples is shorter than one patch ({need} samples "
                f"at {self.sample_rate} Hz); pad clips to at least that length"
            )
        # drop a partial last patch
        return self.spectrogram(wave, lengths)[:, : n_t * self.patch_t]

    def forward(self, x) -> Tokens:
        wave, lengths = waves_at_rate(x, self.sample_rate)
        spec = self._patched_spectrogram(wave, lengths)
        n_t = spec.shape[1] // self.patch_t
        t = self.proj(spec.unsqueeze(1).to(self.proj.weight.dtype))  # (B, D, n_t, n_f)
        n_f = t.shape[-1]
        t = t.flatten(2).transpose(1, 2)  # (B, n_t*n_f, D), time-major
        valid_t = self.n_frames(lengths) // self.patch_t  # (B,) whole patches of real audio
        steps = torch.arange(n_t, device=wave.device)
        valid = (steps[None, :] < valid_t[:, None]).repeat_interleave(n_f, dim=1)  # (B, N)
        return Tokens(t, self.coords(n_t, n_f, wave.device), valid)

    def coords(self, n_t: int, n_f: int, device) -> torch.Tensor:
        """(n_t * n_f, 2) coordinates (time, frequency) in time-major order."""
        ct = time_coords(n_t, self.patch_t * self.hop / self.sample_rate, self.time_span, device)
        cf = 2 * (torch.arange(n_f, dtype=torch.float32, device=device) + 0.5) / n_f - 1
        grid = torch.meshgrid(ct, cf, indexing="ij")  # (n_t, n_f) each
        return torch.stack([g.reshape(-1) for g in grid], dim=-1)


@TOKENIZERS.register("audio_frames")
class AudioFrameTokenizer(nn.Module):
    """Raw waveform -> non-overlapping frames of ``frame_ms`` -> Conv1d embedding; 1-D time coords.

    With ``normalize`` each clip is scaled to zero mean, unit variance over its real samples
    only (as wav2vec 2.0's feature extractor does), so padding does not change it.
    """

    coord_dims = 1

    def __init__(
        self,
        dim: int = 768,
        sample_rate: int = 16000,
        frame_ms: float = 20.0,
        normalize: bool = True,
        time_span: float = 10.24,
    ):
        super().__init__()
        self.dim, self.sample_rate, self.normalize = dim, sample_rate, normalize
        self.frame = round(sample_rate * frame_ms / 1000)
        if self.frame < 1:
            raise ValueError(f"frame_ms {frame_ms} is shorter than one sample at {sample_rate} Hz")
        self.time_span = time_span
        self.proj = nn.Conv1d(1, dim, kernel_size=self.frame, stride=self.frame)

    def example_input(self, batch_size: int = 2) -> dict:
        return example_clips(batch_size, self.sample_rate)

    @property
    def patch_dim(self) -> int:
        """Values per raw frame (``patches``): samples per frame."""
        return self.frame

    def patches(self, x) -> torch.Tensor:
        """Any accepted input -> the (normalised) waveform frames (B, N, frame), in order."""
        wave, lengths = waves_at_rate(x, self.sample_rate)
        wave = self._frames(wave, lengths)
        return wave.reshape(wave.shape[0], -1, self.frame)

    def _frames(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B, n * frame): whole frames, normalised over the real samples."""
        n = wave.shape[1] // self.frame
        if n < 1:
            raise ValueError(
                f"audio of {wave.shape[1]} samples is shorter than one frame ({self.frame})"
            )
        wave = wave[:, : n * self.frame]
        real = torch.arange(wave.shape[1], device=wave.device)[None, :] < lengths[:, None]
        if self.normalize:
            w = real.float()
            cnt = w.sum(1, keepdim=True).clamp_min(1.0)
            mu = (wave * w).sum(1, keepdim=True) / cnt
            var = (((wave - mu) * w) ** 2).sum(1, keepdim=True) / cnt
            wave = (wave - mu) / (var + 1e-7).sqrt() * w  # padding stays exactly zero
        return wave

    def forward(self, x) -> Tokens:
        wave, lengths = waves_at_rate(x, self.sample_rate)
        wave = self._frames(wave, lengths)
        n = wave.shape[1] // self.frame
        t = self.proj(wave.unsqueeze(1).to(self.proj.weight.dtype))  # (B, D, n)
        t = t.transpose(1, 2)  # (B, n, D)
        valid = torch.arange(n, device=wave.device)[None, :] < (lengths // self.frame)[:, None]
        ct = time_coords(n, self.frame / self.sample_rate, self.time_span, wave.device)
        return Tokens(t, ct[:, None], valid)


def default_n_fft(win: int, sample_rate: int, n_mels: int, f_min=0.0, f_max=None) -> int:
    """Smallest power-of-two FFT size >= ``win`` whose bins give every mel filter some weight."""
    n_fft = 2 ** math.ceil(math.log2(win))
    while n_fft < 2**16:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchaudio warns about the empty filters we test
            fb = _torchaudio().functional.melscale_fbanks(
                n_fft // 2 + 1, f_min, f_max or sample_rate / 2, n_mels, sample_rate
            )
        if bool((fb.sum(0) > 0).all()):
            return n_fft
        n_fft *= 2
    raise ValueError(f"n_mels {n_mels} is too many for sample rate {sample_rate}")


def _make_buffers_non_persistent(module: nn.Module) -> None:
    """Re-register every buffer of ``module`` (recursively) as non-persistent."""
    for m in module.modules():
        for name, buf in list(m.named_buffers(recurse=False)):
            m.register_buffer(name, buf, persistent=False)
