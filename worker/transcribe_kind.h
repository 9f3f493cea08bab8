// The "transcribe" job kind: a batch of segments (schema/protocol.md, "transcribe") through one
// resident acoustic model. Each segment's result is the JSON documented there.
#pragma once

#include <memory>
#include <string>

#include "worker/acoustic_model.h"
#include "worker/job_kinds.h"

namespace asrf {

// Registers the batched kind and advertises the model under model->name(). Calls into the model
// are serialised (one device batch at a time per model). `model_sha256` (the model file's) goes
// into every segment result, so a transcript says exactly which model made it.
void RegisterTranscribeKind(std::shared_ptr<AcousticModel> model, JobRegistry* registry,
                            const std::string& model_sha256 = "");

}  // namespace asrf
