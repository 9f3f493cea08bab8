// The "transcribe" job kind: a batch of segments (schema/protocol.md, "transcribe") through one
// resident acoustic model. Each segment's result is the JSON documented there.
#pragma once

#include <memory>

#include "worker/acoustic_model.h"
#include "worker/job_kinds.h"

namespace asrf {

// Registers the batched kind and advertises the model under model->name(). Calls into the model
// are serialised (one device batch at a time per model).
void RegisterTranscribeKind(std::shared_ptr<AcousticModel> model, JobRegistry* registry);

}  // namespace asrf
