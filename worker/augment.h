// Training-time augmentation of audio and features that makes voices and recordings outside the
// training data less foreign: speed change (tempo, pitch and formants move together), low-pass
// filtering (band-limited recordings), room reverberation, background noise and vocal tract
// length perturbation (the spectrum is stretched on the mel axis).
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>

#include <torch/types.h>

namespace asrf {

// Samples of `n` input samples played `factor` times as fast.
size_t SpeedChangedLength(size_t n, double factor);

// Writes SpeedChangedLength(n, factor) samples to `out` (scaled to [-1, 1)): the input read at
// t * factor, linearly interpolated.
void SpeedChange(const int16_t* in, size_t n, double factor, float* out);

// Low-passes `n` samples (16 kHz) in place at `cutoff_hz`: unit gain below it, a raised-cosine
// roll-off over the next 400 Hz, nothing above; what a telephone line or a band-limited recording
// leaves of speech. A cutoff at or above 8 kHz, or fewer than 2 samples, leaves them as they are.
void LowPass(float* samples, size_t n, double cutoff_hz);

// Adds Gaussian noise, drawn from `rng`, `snr_db` below the samples' mean power. `colour` in
// [0, 1) shapes it with a one-pole low-pass: 0 is white (hiss), towards 1 it is ever more hum and
// rumble. Silent input, or fewer than 1 sample, is left as it is.
void AddNoise(float* samples, size_t n, double snr_db, double colour, std::mt19937_64& rng);

// Plays `n` samples in a synthetic room, in place: the direct sound plus a tail of Gaussian noise
// (drawn from `rng`) that decays by 60 dB over `rt60` seconds and holds `drr_db` less energy than
// the direct sound when positive, more when negative (a distant talker). Convolved by FFT, cut to
// `n` samples and scaled back to the input's mean power. An rt60 that is not in (0, 10] s leaves
// the samples as they are.
void Reverberate(float* samples, size_t n, double rt60, double drr_db, std::mt19937_64& rng);

// Writes `n` samples (16 kHz) of background without speech, drawn from `rng`: Gaussian noise
// coloured by a one-pole low-pass (coefficient in [0, 0.99], white hiss to rumble), with mains hum
// (50 or 60 Hz and its harmonics) mixed in or alone in about a third of calls, and a slow swell of
// the level (0.3-4 Hz) in about a third; scaled to a mean level of -50 to -10 dBFS (peaks clipped
// at full scale, as a recorder would). What a training utterance with an empty transcript is made
// of, so the model learns to write nothing for it.
void NonSpeech(float* out, size_t n, std::mt19937_64& rng);

// Surrounds `speech` samples, already at out[before, before + speech), with background without
// speech (NonSpeech, one stretch split in two, so both sides sound alike): `before` samples ahead
// and `after` behind, at a mean power `below_db` under the speech's. What a segment cut from a
// long recording at its pauses holds: the background of the pause on either side of a sentence.
// Silent speech gets silent background.
void PadWithBackground(float* out, size_t before, size_t speech, size_t after, double below_db, std::mt19937_64& rng);

// Stretches one utterance's features [T, 80] (schema/features.md) by `alpha` on the frequency
// axis: the value at mel bin m becomes the value at the bin whose centre frequency is
// centre(m) / alpha (interpolated), so a formant at f moves to alpha * f. Beyond the top bin the
// top bin repeats. In place.
void WarpMelAxis(torch::Tensor features, double alpha);

}  // namespace asrf
