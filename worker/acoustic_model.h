// Inference: a loaded acoustic model that turns 16 kHz PCM into text with timestamps. The model
// (weights, loaded once at start, resident) is apart from the per-call state; one instance may be
// used from one thread at a time (the worker serialises calls per device).
//
// Two implementations:
//  - the project's own CTC model (worker/ctc_model.h): a model file holding config and weights;
//  - TorchScript CTC models: forward(features[B,T,80], lengths[B]) -> (log_probs[B,T',V],
//    out_lengths[B]), with a vocabulary file (one token per line; line 1 is the blank; a line
//    holding a single space or "|" or "<space>" is the word separator).
// Both use the front end of schema/features.md (worker/features.h) and CTC greedy decoding, or a
// beam search with a character language model when one is given.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "worker/ctc_beam.h"

namespace asrf {

struct DecodedWord {
  std::string text;
  double start = 0, end = 0;  // seconds from the start of the utterance
  double confidence = 0;      // mean over the word's emitted tokens of their frame probability
};

struct Hypothesis {
  std::string text;  // normalised: lowercase, single spaces
  std::vector<DecodedWord> words;
};

struct AcousticModelOptions {
  std::string device = "cpu";          // "cpu" or "cuda:N"
  std::string vocabulary;              // TorchScript models only: the vocabulary file
  int64_t max_batch_frames = 48000;    // feature frames (10 ms) per device micro-batch, padding included
  int threads = 0;                     // intra-op threads; 0 = libtorch's default
  // Decoding: greedy without a language model; with `lm` (a character n-gram file made by asr-lm)
  // a CTC prefix beam search that scores prefixes with it (`beam` options).
  std::string lm;
  BeamOptions beam;
};

class AcousticModel {
 public:
  virtual ~AcousticModel() = default;
  // Transcribes each utterance (16 kHz mono PCM). Utterances are sorted by length and run in
  // device micro-batches of at most max_batch_frames padded frames; the results are in input
  // order and do not depend on how the inputs were batched. An empty utterance, and one without
  // speech (NoSpeech), gives an empty hypothesis. Errors: IOError for a libtorch failure (with
  // its message).
  virtual Status Transcribe(const std::vector<std::span<const int16_t>>& utterances,
                            std::vector<Hypothesis>* out) = 0;
  // "name" as given to Load (file stem unless set).
  virtual const std::string& name() const = 0;
  virtual std::string device() const = 0;
};

// True when 16 kHz audio holds no speech to speak of: no 100 ms stretch of it is above -40 dBFS
// or more than 6 dB above its quietest stretch of sound (faint steady hiss or hum, digital
// silence, or both: frames of digital silence are left out of the quietest stretch).
// Audio under 100 ms: false (the model decides).
bool NoSpeech(std::span<const int16_t> pcm);

// Loads `path`: a project model file (config + weights) or, failing that, a TorchScript module
// (which then needs options.vocabulary). Errors: Invalid for a file that is neither, NotFound
// for a missing file, Unavailable for cuda:N when libtorch has no CUDA or no such device.
Status LoadAcousticModel(const std::string& path, const std::string& name, const AcousticModelOptions& options,
                         std::unique_ptr<AcousticModel>* out);

}  // namespace asrf
