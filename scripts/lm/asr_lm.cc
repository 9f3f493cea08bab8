// asr-lm: builds the character language model the CTC beam search uses (worker/char_lm.h) from
// sentences, and measures a model's perplexity on other sentences. See `asr-lm --help`.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/options.h"
#include "worker/char_lm.h"

namespace {

// Sentences of a file: the "text" field of each line of a .jsonl manifest, otherwise each line.
bool ReadSentences(const std::string& path, std::vector<std::string>* out, std::string* error) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    *error = path + " is a folder; give sentence files";
    return false;
  }
  std::ifstream in(path);
  if (!in) {
    *error = "cannot read " + path;
    return false;
  }
  const bool jsonl = path.size() > 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0;
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (!jsonl) {
      out->push_back(line);
      continue;
    }
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("text") || !j["text"].is_string()) {
      *error = path + ":" + std::to_string(lineno) + ": not a JSON object with a string \"text\"";
      return false;
    }
    out->push_back(j["text"].get<std::string>());
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace asrf;
  std::string out, alphabet = " 'abcdefghijklmnopqrstuvwxyz", model;
  std::vector<std::string> inputs;
  int order = 6;
  po::options_description desc("asr-lm options");
  desc.add_options()
      ("input", po::value(&inputs)->multitoken(),
       "sentence files: a .jsonl manifest's \"text\" fields, or any other file one sentence per line (repeatable)")
      ("out", po::value(&out)->default_value(""), "build: write the language model here")
      ("order", po::value(&order)->default_value(order), "n-gram order in characters (1..10)")
      ("alphabet", po::value(&alphabet)->default_value(alphabet, "\" 'a-z\""),
       "characters of the model (the acoustic model's vocabulary; others become word breaks)")
      ("perplexity", po::value(&model)->default_value(""),
       "instead of building: print this language model's per-character perplexity on the --input sentences");
  po::variables_map vm;
  ParseResult pr = ParseOptions(argc, argv, desc,
                                "usage: asr-lm --input train-sentences.txt [--input ...] --out en.lm [--order 6]\n"
                                "       asr-lm --perplexity en.lm --input valid.jsonl",
                                &vm);
  if (!pr.proceed) return pr.exit_code;
  auto fail = [](const std::string& m, int code) {
    std::cerr << "asr-lm: error: " << m << "\n";
    return code;
  };
  if (inputs.empty()) return fail("give at least one --input file (run with --help)", 2);
  if (model.empty() == out.empty()) return fail("give either --out (build) or --perplexity MODEL", 2);
  std::error_code ec;
  if (!out.empty() && std::filesystem::is_directory(out, ec)) return fail("--out " + out + " is a folder; give a file", 2);
  // The acoustic model's vocabulary is lower case; sentences are lower-cased as they are read.
  std::transform(alphabet.begin(), alphabet.end(), alphabet.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  std::vector<std::string> sentences;
  for (const auto& p : inputs) {
    std::string error;
    if (!ReadSentences(p, &sentences, &error)) return fail(error, 1);
  }
  if (sentences.empty()) return fail("the --input files hold no sentence", 1);
  if (!model.empty()) {
    CharLm lm;
    if (Status s = CharLm::Load(model, &lm); !s.ok()) return fail(s.ToString(), 1);
    double nll = 0;
    size_t chars = 0;
    for (const auto& s : sentences) {
      uint64_t ctx = lm.Start();
      auto score = [&](int sym) {
        nll -= lm.LogProb(ctx, sym);
        ++chars;
        ctx = lm.Next(ctx, sym);
      };
      // As Build reads a sentence: other characters break words, no leading, double or trailing
      // space (a space is scored only when a character follows it).
      bool started = false, pending_space = false;
      for (char raw : s) {
        char c = static_cast<char>(std::tolower(static_cast<unsigned char>(raw)));
        int sym = lm.Symbol(c);
        if (sym == 0 || c == ' ') {
          pending_space = started;
          continue;
        }
        if (pending_space) score(lm.Symbol(' '));
        pending_space = false;
        started = true;
        score(sym);
      }
      nll -= lm.LogProb(ctx, lm.End());
      ++chars;
    }
    std::cout << "{\"sentences\": " << sentences.size() << ", \"characters\": " << chars
              << ", \"perplexity\": " << std::exp(nll / static_cast<double>(std::max<size_t>(chars, 1))) << "}\n";
    return 0;
  }
  // Each distinct sentence counts once: a corpus that repeats sentences must not skew the model.
  std::set<std::string> distinct(sentences.begin(), sentences.end());
  std::vector<std::string> unique(distinct.begin(), distinct.end());
  CharLm lm;
  if (Status s = CharLm::Build(unique, alphabet, order, &lm); !s.ok()) return fail(s.ToString(), 1);
  if (Status s = lm.Save(out); !s.ok()) return fail(s.ToString(), 1);
  std::cout << "{\"sentences\": " << unique.size() << ", \"order\": " << order << ", \"ngrams\": " << lm.ngrams()
            << ", \"out\": " << nlohmann::json(out).dump() << "}\n";
  return 0;
}
