"""Speech-like audio and non-speech backgrounds at 16 kHz for the voice activity detector.

Speech is a source-filter imitation: a harmonic-rich glottal source with a drifting pitch, shaped
by three vowel formants that change every syllable, syllable amplitude envelopes, fricative noise
bursts between some syllables and a background at a random signal-to-noise ratio. Non-speech is
near-silence, coloured noise or mains hum. Float32 in [-1, 1], as silero-vad reads audio.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

SAMPLE_RATE = 16_000
# (F1, F2, F3) in Hz of a few vowels (adult averages)
_VOWELS = (
    (730, 1090, 2440),
    (270, 2290, 3010),
    (300, 870, 2240),
    (530, 1840, 2480),
    (570, 840, 2410),
    (660, 1720, 2410),
    (490, 1350, 1690),
    (440, 1020, 2240),
)


def _resonate(x: np.ndarray, frequency: float, bandwidth: float) -> np.ndarray:
    """A two-pole resonator (one formant), unit gain at its centre frequency."""
    radius = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * frequency / SAMPLE_RATE
    a = [1.0, -2 * radius * np.cos(theta), radius**2]
    z = np.exp(-1j * theta)
    gain = float(np.abs(a[0] + a[1] * z + a[2] * z**2))  # |A(e^{j theta})|
    return signal.lfilter([gain], a, x)


def _voiced(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    base = rng.uniform(90, 240)
    f0 = base * (
        1
        + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 2 * np.pi))
        + rng.uniform(-0.15, 0.15) * t / max(t[-1], 1e-3)
    )
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    harmonics = np.arange(1, int(4000 / base) + 1)
    source = (np.sin(np.outer(phase, harmonics)) / harmonics**1.1).sum(axis=1)
    source *= 1 + 0.05 * rng.standard_normal(n)  # jitter and breathiness
    vowel = _VOWELS[int(rng.integers(len(_VOWELS)))]
    shaped = sum(
        _resonate(source, f * rng.uniform(0.9, 1.1), bw) / (i + 1)
        for i, (f, bw) in enumerate(zip(vowel, (80, 100, 140)))
    )
    return shaped * np.hanning(n) ** 0.5


def _fricative(rng: np.random.Generator, n: int) -> np.ndarray:
    low = rng.uniform(2500, 4500)
    sos = signal.butter(4, [low, min(low * 1.8, 7800)], btype="bandpass", fs=SAMPLE_RATE, output="sos")
    return signal.sosfilt(sos, rng.standard_normal(n)) * np.hanning(n) * rng.uniform(0.1, 0.4)


def _add(out: np.ndarray, position: int, piece: np.ndarray) -> None:
    """out[position:] += piece, cut at the end of out."""
    end = min(len(out), position + len(piece))
    out[position:end] += piece[: max(0, end - position)]


def speech(rng: np.random.Generator, n: int) -> np.ndarray:
    """n samples of a speech-like utterance: syllables of 80-280 ms, short gaps, some fricatives."""
    out = np.zeros(n)
    position = int(rng.integers(0, SAMPLE_RATE // 20))
    while position < n:
        if rng.random() < 0.3:
            length = int(rng.uniform(0.03, 0.09) * SAMPLE_RATE)
            _add(out, position, _fricative(rng, length))
            position += length
        length = int(rng.uniform(0.08, 0.28) * SAMPLE_RATE)
        _add(out, position, _voiced(rng, length))
        position += length + int(rng.uniform(0.0, 0.08) * SAMPLE_RATE)
    out *= rng.uniform(0.05, 0.15) / max(np.sqrt(np.mean(out**2)), 1e-9)
    return out + _background(rng, n) * 10 ** (-rng.uniform(10, 40) / 20) * rng.uniform(0.05, 0.15)


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-RMS coloured noise (white through brown-ish)."""
    noise = signal.lfilter([1.0], [1.0, -rng.uniform(0.0, 0.98)], rng.standard_normal(n))
    return noise / max(np.sqrt(np.mean(noise**2)), 1e-9)


def non_speech(rng: np.random.Generator, n: int) -> np.ndarray:
    """n samples of near-silence, coloured noise or mains hum."""
    kind = int(rng.integers(3))
    if kind == 0:
        return _background(rng, n) * rng.uniform(1e-4, 2e-3)
    if kind == 1:
        return _background(rng, n) * rng.uniform(0.005, 0.08)
    t = np.arange(n) / SAMPLE_RATE
    mains = 50.0 if rng.random() < 0.5 else 60.0
    hum = sum(np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 2 * np.pi)) / k for k in (1, 2, 3, 5))
    return hum * rng.uniform(0.005, 0.05) + _background(rng, n) * 1e-3


def clips(rng: np.random.Generator, count: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """count clips [count, samples] float32, half speech; and is_speech [count] float32 (0 or 1)."""
    is_speech = rng.permutation(np.arange(count) % 2).astype(np.float32)
    audio = np.stack([speech(rng, samples) if s else non_speech(rng, samples) for s in is_speech])
    return np.clip(audio, -1.0, 1.0).astype(np.float32), is_speech
