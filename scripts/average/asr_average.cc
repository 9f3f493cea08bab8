// asr-average: writes a model whose weights are the weighted mean of the given models' weights.
// Averaging works for runs of one network where one started from the other (asr-submit train
// --init): the mean often keeps what each run learnt better than either alone. See --help.
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "common/options.h"
#include "worker/ctc_model.h"

int main(int argc, char** argv) {
  using namespace asrf;
  std::vector<std::string> inputs;
  std::vector<double> weights;
  std::string out;
  po::options_description desc("asr-average options");
  desc.add_options()
      ("input", po::value(&inputs)->multitoken(), "a model file (.pt) to average; give two or more, of one network")
      ("weight", po::value(&weights)->multitoken(),
       "each --input's weight, in the same order (>= 0, normalised to sum to 1); default: all equal")
      ("out", po::value(&out)->default_value(""), "write the averaged model here (never one of the inputs)");
  po::variables_map vm;
  ParseResult pr = ParseOptions(argc, argv, desc,
                                "usage: asr-average --input run-a.pt --input run-b.pt [--weight 0.5 --weight 0.5] "
                                "--out mean.pt",
                                &vm);
  if (!pr.proceed) return pr.exit_code;
  auto fail = [](const std::string& m, int code) {
    std::cerr << "asr-average: error: " << m << "\n";
    return code;
  };
  if (inputs.size() < 2) return fail("give two or more --input models (run with --help)", 2);
  if (out.empty()) return fail("give --out FILE", 2);
  for (const auto& in : inputs) {
    if (in == out) return fail("--out " + out + " is one of the inputs; write somewhere else", 2);
  }
  if (weights.empty()) weights.assign(inputs.size(), 1.0);
  if (weights.size() != inputs.size()) {
    return fail(std::to_string(weights.size()) + " --weight for " + std::to_string(inputs.size()) +
                    " --input; give one per input, or none", 2);
  }
  std::vector<CtcModel> models;
  for (const auto& in : inputs) {
    CtcModel m(nullptr);
    if (Status st = LoadModel(in, &m); !st.ok()) return fail(st.message(), 1);
    models.push_back(m);
  }
  CtcModel mean(nullptr);
  if (Status st = AverageModels(models, weights, &mean); !st.ok()) return fail(st.message(), 2);
  const std::string tmp = out + ".partial";
  if (Status st = SaveModel(mean, tmp); !st.ok()) return fail(st.message(), 1);
  if (std::rename(tmp.c_str(), out.c_str()) != 0) return fail("cannot rename " + tmp + " to " + out, 1);
  double sum = 0;
  for (double w : weights) sum += w;
  std::cout << "wrote " << out << ":";
  for (size_t i = 0; i < inputs.size(); ++i) std::cout << " " << weights[i] / sum << " x " << inputs[i];
  std::cout << "\n";
  return 0;
}
