#include "worker/ctc_beam.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace asrf {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

double LogAdd(double a, double b) {
  if (a == kNegInf) return b;
  if (b == kNegInf) return a;
  double m = std::max(a, b);
  return m + std::log1p(std::exp(-std::fabs(a - b)));
}

// A prefix is a node of a trie: its last class, its parent, the LM context after it and the score
// its last class added (LM weight times log-probability, plus the bonus).
struct Node {
  int64_t parent;
  int64_t id;
  uint64_t context;
  uint64_t word;  // hash of the characters since the last space (CharLm::WordHash)
  double ext;
  std::vector<std::pair<int64_t, int64_t>> children;  // class -> node
};

}  // namespace

std::vector<int64_t> CtcBeamSearch(const float* lp, int64_t T, int64_t V, const std::vector<int>& class_symbol,
                                   const CharLm* lm, const BeamOptions& o) {
  std::vector<Node> nodes;
  nodes.push_back({-1, 0, lm ? lm->Start() : 0, CharLm::kEmptyWord, 0.0, {}});
  const bool lexicon = lm && lm->words() > 0 && o.oov_penalty != 0;
  const int space = lm ? lm->Symbol(' ') : -1;
  // The penalty for the word a prefix ends with, when the lexicon does not know it.
  auto unknown = [&](uint64_t word) {
    return lexicon && word != CharLm::kEmptyWord && !lm->HasWord(word) ? o.oov_penalty : 0.0;
  };
  auto child = [&](int64_t n, int64_t c) -> int64_t {
    for (const auto& [k, i] : nodes[n].children)
      if (k == c) return i;
    double ext = o.char_bonus;
    uint64_t ctx = nodes[n].context, word = nodes[n].word;
    if (lm) {
      int sym = c < static_cast<int64_t>(class_symbol.size()) ? class_symbol[c] : 0;
      ext += o.lm_weight * lm->LogProb(ctx, sym);
      if (sym > 0) ctx = lm->Next(ctx, sym);
      if (sym == space) {
        ext += unknown(word);
        word = CharLm::kEmptyWord;
      } else {
        word = CharLm::ExtendWordHash(word, sym > 0 ? lm->alphabet()[static_cast<size_t>(sym - 1)] : '\x01');
      }
    }
    nodes.push_back({n, c, ctx, word, ext, {}});
    int64_t i = static_cast<int64_t>(nodes.size()) - 1;
    nodes[n].children.emplace_back(c, i);
    return i;
  };
  struct Entry {
    int64_t node;
    double pb, pnb;
  };
  std::vector<Entry> beam = {{0, 0.0, kNegInf}};
  std::vector<double> nb, nnb;  // per node: next blank-ending / non-blank-ending scores
  std::vector<uint8_t> mark;
  std::vector<int64_t> touched;
  std::vector<int64_t> cands;
  const int width = std::max(1, o.beam);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = lp + t * V;
    cands.clear();
    int64_t top = 1;
    for (int64_t c = 1; c < V; ++c) {
      if (row[c] >= o.prune_log_prob) cands.push_back(c);
      if (row[c] > row[top]) top = c;
    }
    if (cands.empty() && V > 1) cands.push_back(top);
    auto add = [&](int64_t n) {
      if (static_cast<size_t>(n) >= nb.size()) {
        nb.resize(nodes.size() * 2, kNegInf);
        nnb.resize(nodes.size() * 2, kNegInf);
        mark.resize(nodes.size() * 2, 0);
      }
      if (!mark[n]) {
        mark[n] = 1;
        touched.push_back(n);
      }
    };
    for (const Entry& e : beam) {
      const double total = LogAdd(e.pb, e.pnb);
      add(e.node);
      nb[e.node] = LogAdd(nb[e.node], total + row[0]);
      for (int64_t c : cands) {
        const double p = row[c];
        if (c == nodes[e.node].id) {
          nnb[e.node] = LogAdd(nnb[e.node], e.pnb + p);  // the same run goes on
          if (e.pb == kNegInf) continue;
          int64_t ch = child(e.node, c);
          add(ch);
          nnb[ch] = LogAdd(nnb[ch], e.pb + p + nodes[ch].ext);  // a repeat after a blank
        } else {
          int64_t ch = child(e.node, c);
          add(ch);
          nnb[ch] = LogAdd(nnb[ch], total + p + nodes[ch].ext);
        }
      }
    }
    std::vector<Entry> next;
    next.reserve(touched.size());
    for (int64_t n : touched) {
      next.push_back({n, nb[n], nnb[n]});
      nb[n] = nnb[n] = kNegInf;
      mark[n] = 0;
    }
    touched.clear();
    const size_t keep = std::min<size_t>(static_cast<size_t>(width), next.size());
    std::partial_sort(next.begin(), next.begin() + static_cast<std::ptrdiff_t>(keep), next.end(),
                      [](const Entry& a, const Entry& b) { return LogAdd(a.pb, a.pnb) > LogAdd(b.pb, b.pnb); });
    next.resize(keep);
    beam.swap(next);
  }
  // The end of the sentence is part of the LM's score, except for the empty prefix: the LM never
  // saw an empty sentence, and the price of ending one (tens of nats) made a silent segment come
  // out as a made-up letter or word. Nothing said is the acoustic model's call alone.
  int64_t best = 0;
  double best_score = kNegInf;
  for (const Entry& e : beam) {
    double s = LogAdd(e.pb, e.pnb);
    if (lm && e.node != 0) {
      s += o.lm_weight * lm->LogProb(nodes[e.node].context, lm->End()) + unknown(nodes[e.node].word);
    }
    if (s > best_score) {
      best_score = s;
      best = e.node;
    }
  }
  std::vector<int64_t> ids;
  for (int64_t n = best; n > 0; n = nodes[n].parent) ids.push_back(nodes[n].id);
  std::reverse(ids.begin(), ids.end());
  return ids;
}

std::vector<AlignedToken> CtcAlign(const float* lp, int64_t T, int64_t V, const std::vector<int64_t>& ids) {
  const int64_t L = static_cast<int64_t>(ids.size());
  const int64_t S = 2 * L + 1;
  if (L == 0 || T <= 0) return {};
  for (int64_t id : ids)
    if (id < 1 || id >= V) return {};
  auto label = [&](int64_t s) { return s % 2 == 0 ? int64_t{0} : ids[static_cast<size_t>(s / 2)]; };
  std::vector<double> prev(S, kNegInf), cur(S, kNegInf);
  std::vector<uint8_t> back(static_cast<size_t>(T * S), 0);  // 0: stay, 1: from s-1, 2: from s-2
  prev[0] = lp[label(0)];
  if (S > 1) prev[1] = lp[label(1)];
  for (int64_t t = 1; t < T; ++t) {
    const float* row = lp + t * V;
    for (int64_t s = 0; s < S; ++s) {
      double best = prev[s];
      uint8_t from = 0;
      if (s >= 1 && prev[s - 1] > best) {
        best = prev[s - 1];
        from = 1;
      }
      if (s >= 2 && s % 2 == 1 && label(s) != label(s - 2) && prev[s - 2] > best) {
        best = prev[s - 2];
        from = 2;
      }
      cur[s] = best == kNegInf ? kNegInf : best + row[label(s)];
      back[static_cast<size_t>(t * S + s)] = from;
    }
    prev.swap(cur);
  }
  int64_t s = S - 1;
  if (S >= 2 && prev[S - 2] > prev[S - 1]) s = S - 2;
  if (prev[s] == kNegInf) return {};
  std::vector<int64_t> state(static_cast<size_t>(T));
  for (int64_t t = T - 1; t >= 0; --t) {
    state[static_cast<size_t>(t)] = s;
    if (t > 0) s -= back[static_cast<size_t>(t * S + s)];
  }
  std::vector<AlignedToken> out;
  for (int64_t t = 0; t < T; ++t) {
    int64_t st = state[static_cast<size_t>(t)];
    if (st % 2 == 0) continue;
    float p = std::exp(lp[t * V + label(st)]);
    if (!out.empty() && t > 0 && state[static_cast<size_t>(t - 1)] == st) {
      out.back().last = t;
      out.back().prob = std::max(out.back().prob, p);
    } else {
      out.push_back({label(st), t, t, p});
    }
  }
  return out;
}

}  // namespace asrf
