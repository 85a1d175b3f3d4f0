// g++ -O3 -march=native -o /tmp/std_nth_element benchmarks/std_nth_element.cpp && /tmp/std_nth_element [n]
//
// libstdc++'s own cost of selecting the k-th of n (key, position) pairs by the partitions std::sort makes
// (__introselect uses the same __unguarded_partition_pivot as __introsort_loop), against which mergelab's
// compiled sort replay (2.7-2.9 ns per entry, benchmarks/exact_order_stages.py) can be read.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

static uint16_t bf16_bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16); }

int main(int argc, char** argv) {
  const size_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 11272192;  // 2048 x 5504
  const double density = 0.3;
  std::mt19937_64 rng(0);
  std::normal_distribution<float> normal(0.f, 0.002f);
  std::vector<uint16_t> keys(n);
  for (auto& k : keys) k = bf16_bits(std::fabs(normal(rng))) & 0x7fff;  // |delta| of bf16 magnitudes, many tied
  const size_t k = size_t(density * n);
  for (int pairs = 0; pairs < 2; ++pairs) {
    double best_sel = 1e9, best_sort = 1e9;
    for (int rep = 0; rep < 5; ++rep) {
      std::vector<uint32_t> idx(n);
      for (size_t i = 0; i < n; ++i) idx[i] = uint32_t(i);
      auto greater = [&](uint32_t a, uint32_t b) { return keys[a] > keys[b]; };
      auto t0 = std::chrono::steady_clock::now();
      if (pairs) {  // keys packed beside positions, as the replay's words
        std::vector<uint64_t> w(n);
        for (size_t i = 0; i < n; ++i) w[i] = (uint64_t(0x7fff - keys[i]) << 32) | i;
        auto c = [](uint64_t a, uint64_t b) { return (a >> 32) < (b >> 32); };
        std::nth_element(w.begin(), w.begin() + k, w.end(), c);
      } else {
        std::nth_element(idx.begin(), idx.begin() + k, idx.end(), greater);
      }
      auto t1 = std::chrono::steady_clock::now();
      best_sel = std::min(best_sel, std::chrono::duration<double>(t1 - t0).count());
      if (rep < 2) {
        for (size_t i = 0; i < n; ++i) idx[i] = uint32_t(i);
        auto t2 = std::chrono::steady_clock::now();
        std::sort(idx.begin(), idx.end(), greater);
        auto t3 = std::chrono::steady_clock::now();
        best_sort = std::min(best_sort, std::chrono::duration<double>(t3 - t2).count());
      }
    }
    std::printf("%s: nth_element %.2f ns/entry, sort %.2f ns/entry (n=%zu, best of 5 / 2)\n",
                pairs ? "packed words" : "positions, keys looked up", best_sel / n * 1e9, best_sort / n * 1e9, n);
  }
}
