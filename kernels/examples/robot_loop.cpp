// robot_loop.cpp — a control loop over libnora_edge the way a ROS 2 node would drive it (no ROS dependency):
// an RAII wrapper of the C ABI (include/nora_edge.h), a deterministic fake camera, one select_action per tick.
//
//   robot_loop BUNDLE_DIR [--ticks N] [--hz F] [--instruction TEXT] [--ort PATH] [--unnorm-key KEY]
//              [--threads N] [--episode N] [--seed S] [--height H] [--width W] [--flag]
//              [--frames-out FILE] [--multi-token]
//
// Data flow per tick: FakeCamera::grab() -> (H, W, 3) uint8 frame --nora::Policy::select_action (the next queued
// action; a new (T, D) chunk is run through the model when the queue is empty)--> (D,) float64 action -> stdout.
// At tick 0 (and every --episode ticks when given) the loop calls reset(), an episode start: the queue is dropped
// and the next tick runs a new chunk. In a ROS 2 node the tick body is the timer callback (rclcpp::create_timer at
// --hz), the frame comes from a sensor_msgs/Image subscription and the action goes out on a publisher.
//
// Output, one JSON object per line:
//   {"tick": k, "episode_start": bool, "new_chunk": bool, "latency_ms": x, "action": [a0, ...]}   per tick
//   {"summary": {"ticks": N, "chunks": C, "median_ms": x, "max_ms": x, "overruns": n, "hz": F}} at the end
// Actions are printed with %.17g (exact float64 round trip). Latency: the select_action call (steady_clock).
// Overruns: ticks that ended after their deadline (tick k's deadline is start + (k + 1) / hz).
// --frames-out FILE also writes every frame the loop grabbed, raw (ticks, H, W, 3) uint8, for checking the camera.
// Exit status: 0 success, 1 a library call failed ("robot_loop: <call>: <status name>: <message>"), 2 bad usage.
//
// Fake camera (reproduced by tests/kernels/test_edge_examples.py::camera_frames): a xorshift32 stream (Marsaglia,
// "Xorshift RNGs", J. Stat. Softw. 8(14), 2003, https://doi.org/10.18637/jss.v008.i14: x ^= x << 13;
// x ^= x >> 17; x ^= x << 5 on uint32) seeded with --seed (default 2463534242, nonzero). Frame k takes the next
// ceil(H*W*3 / 4) outputs; their bytes, least significant first, are the noise bytes b[i] of the frame in (y, x, c)
// row-major order (bytes past H*W*3 of the last output are dropped). Pixel (y, x, c) of frame k is
//   (b >> 1) + ((x + 37 * k) % W) * 128 / W        (integer division; at most 127 + 127 = 254)
// a horizontal ramp panning 37 columns per frame under uniform sensor noise, so each frame differs.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "nora_edge.h"

namespace nora {

inline const char* status_name(nora_edge_status s) {
    switch (s) {
    case NORA_EDGE_OK: return "NORA_EDGE_OK";
    case NORA_EDGE_ERR_INPUT: return "NORA_EDGE_ERR_INPUT";
    case NORA_EDGE_ERR_BUNDLE: return "NORA_EDGE_ERR_BUNDLE";
    case NORA_EDGE_ERR_DETOKENIZE: return "NORA_EDGE_ERR_DETOKENIZE";
    case NORA_EDGE_ERR_FORCED: return "NORA_EDGE_ERR_FORCED";
    case NORA_EDGE_ERR_UNSUPPORTED: return "NORA_EDGE_ERR_UNSUPPORTED";
    case NORA_EDGE_ERR_RUNTIME: return "NORA_EDGE_ERR_RUNTIME";
    case NORA_EDGE_ERR_NOMEM: return "NORA_EDGE_ERR_NOMEM";
    }
    return "NORA_EDGE_ERR_UNKNOWN";
}

// A failed library call: the status and "<call>: <status name>: <nora_edge_last_error()>".
class Error : public std::runtime_error {
public:
    Error(nora_edge_status status, const std::string& call)
        : std::runtime_error(call + ": " + status_name(status) + ": " + nora_edge_last_error()), status_(status) {}
    nora_edge_status status() const noexcept { return status_; }

private:
    nora_edge_status status_;
};

inline void check(nora_edge_status s, const char* call) {
    if (s != NORA_EDGE_OK) {
        throw Error(s, call);  // reads nora_edge_last_error() now, on the failing thread
    }
}

// A borrowed (height, width, 3) uint8 RGB frame with a row stride in bytes.
struct Frame {
    const uint8_t* rgb = nullptr;
    int32_t height = 0, width = 0;
    size_t stride = 0;
};

// One loaded bundle; movable, not copyable; destroyed with nora_policy_destroy.
class Policy {
public:
    struct Options {
        std::string onnxruntime_path;  // empty: $NORA_EDGE_ONNXRUNTIME
        int32_t threads = 0;           // intra-op threads per graph, 0 = onnxruntime's default
        bool verify_hashes = false;
        bool flag_forced = false;      // hand out chunks with repaired / forced tokens (flagged) instead of failing
        bool multi_token = false;      // NORA_EDGE_DECODE_MULTI_TOKEN (a bundle exported with --multi-token): the
                                       // same actions, fewer decoder calls once earlier chunks give drafts
    };

    Policy(const std::string& bundle_dir, const Options& o) {
        nora_policy_options opt;
        nora_policy_options_init(&opt);
        opt.onnxruntime_path = o.onnxruntime_path.empty() ? nullptr : o.onnxruntime_path.c_str();
        opt.threads = o.threads;
        opt.verify_hashes = o.verify_hashes ? 1 : 0;
        opt.forced_tokens = o.flag_forced ? NORA_EDGE_FORCED_FLAG : NORA_EDGE_FORCED_REFUSE;
        opt.decoding = o.multi_token ? NORA_EDGE_DECODE_MULTI_TOKEN : NORA_EDGE_DECODE_PLAIN;
        nora_policy* raw = nullptr;
        check(nora_policy_create(bundle_dir.c_str(), &opt, &raw), "nora_policy_create");
        handle_.reset(raw);
        info_.struct_size = sizeof info_;
        check(nora_policy_get_info(handle_.get(), &info_), "nora_policy_get_info");
    }

    const nora_policy_info& info() const noexcept { return info_; }

    // The next (D,) action into `action` (resized); true when this call ran the model for a new chunk.
    bool select_action(const Frame& f, const std::string& instruction, const std::optional<std::string>& unnorm_key,
                       std::vector<double>& action) {
        action.resize(static_cast<size_t>(info_.action_dim));
        int32_t fresh = 0;
        check(nora_policy_select_action(handle_.get(), f.rgb, f.height, f.width, f.stride, instruction.c_str(),
                                        unnorm_key ? unnorm_key->c_str() : nullptr, action.data(), action.size(),
                                        &fresh),
              "nora_policy_select_action");
        return fresh != 0;
    }

    // Forget queued actions (episode start).
    void reset() { check(nora_policy_reset(handle_.get()), "nora_policy_reset"); }

private:
    struct Deleter {
        void operator()(nora_policy* p) const noexcept { nora_policy_destroy(p); }
    };
    std::unique_ptr<nora_policy, Deleter> handle_;
    nora_policy_info info_{};
};

// Deterministic frames (format in the file comment); the buffer is reused, a Frame is valid until the next grab.
class FakeCamera {
public:
    FakeCamera(int32_t height, int32_t width, uint32_t seed)
        : height_(height), width_(width), state_(seed), pixels_(static_cast<size_t>(height) * width * 3) {
        if (seed == 0) {
            throw std::invalid_argument("the xorshift32 seed must be nonzero");
        }
    }

    Frame grab() {
        const size_t n = pixels_.size();
        for (size_t i = 0; i < n; i += 4) {
            uint32_t x = next();
            for (size_t j = 0; j < 4 && i + j < n; j++) {
                pixels_[i + j] = static_cast<uint8_t>(x >> (8 * j)) >> 1;
            }
        }
        const int64_t w = width_;
        for (int64_t y = 0; y < height_; y++) {
            uint8_t* row = pixels_.data() + static_cast<size_t>(y * w * 3);
            for (int64_t x = 0; x < w; x++) {
                const auto ramp = static_cast<uint8_t>(((x + 37 * frame_) % w) * 128 / w);
                for (int c = 0; c < 3; c++) {
                    row[x * 3 + c] = static_cast<uint8_t>(row[x * 3 + c] + ramp);
                }
            }
        }
        frame_++;
        return Frame{pixels_.data(), height_, width_, static_cast<size_t>(width_) * 3};
    }

private:
    uint32_t next() {
        state_ ^= state_ << 13;
        state_ ^= state_ >> 17;
        state_ ^= state_ << 5;
        return state_;
    }

    int32_t height_, width_;
    uint32_t state_;
    int64_t frame_ = 0;
    std::vector<uint8_t> pixels_;
};

}  // namespace nora

namespace {

struct Args {
    std::string bundle, instruction = "pick up the red block", frames_out;
    std::optional<std::string> unnorm_key;
    nora::Policy::Options options;
    long ticks = 20, episode = 0;
    double hz = 10.0;
    uint32_t seed = 2463534242u;
    int32_t height = 224, width = 224;
};

[[noreturn]] void usage(const std::string& msg) {
    std::fprintf(stderr,
                 "robot_loop: %s\nusage: robot_loop BUNDLE_DIR [--ticks N] [--hz F] [--instruction TEXT] "
                 "[--ort PATH] [--unnorm-key KEY] [--threads N] [--episode N] [--seed S] [--height H] "
                 "[--width W] [--flag] [--frames-out FILE] [--multi-token]\n",
                 msg.c_str());
    std::exit(2);
}

long to_long(const std::string& opt, const char* v, long lo, long hi) {
    char* end = nullptr;
    long x = std::strtol(v, &end, 10);
    if (!*v || *end || x < lo || x > hi) {
        usage(opt + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got '" +
              v + "'");
    }
    return x;
}

Args parse(int argc, char** argv) {
    Args a;
    bool have_bundle = false;
    for (int i = 1; i < argc; i++) {
        const std::string s = argv[i];
        if (s == "--flag") {
            a.options.flag_forced = true;
            continue;
        }
        if (s == "--multi-token") {
            a.options.multi_token = true;
            continue;
        }
        if (s.rfind("--", 0) != 0) {
            if (have_bundle) {
                usage("unexpected argument '" + s + "'");
            }
            a.bundle = s;
            have_bundle = true;
            continue;
        }
        if (i + 1 >= argc) {
            usage(s + " needs a value");
        }
        const char* v = argv[++i];
        if (s == "--ticks") {
            a.ticks = to_long(s, v, 1, 1000000);
        } else if (s == "--hz") {
            char* end = nullptr;
            a.hz = std::strtod(v, &end);
            if (!*v || *end || !(a.hz > 0.0 && a.hz <= 1e6)) {
                usage(std::string("--hz must be a number in (0, 1e6], got '") + v + "'");
            }
        } else if (s == "--instruction") {
            a.instruction = v;
        } else if (s == "--frames-out") {
            a.frames_out = v;
        } else if (s == "--ort") {
            a.options.onnxruntime_path = v;
        } else if (s == "--unnorm-key") {
            a.unnorm_key = std::string(v);
        } else if (s == "--threads") {
            a.options.threads = static_cast<int32_t>(to_long(s, v, 0, 1024));
        } else if (s == "--episode") {
            a.episode = to_long(s, v, 0, 1000000);
        } else if (s == "--seed") {
            a.seed = static_cast<uint32_t>(to_long(s, v, 1, 4294967295L));
        } else if (s == "--height") {
            a.height = static_cast<int32_t>(to_long(s, v, 1, 8192));
        } else if (s == "--width") {
            a.width = static_cast<int32_t>(to_long(s, v, 1, 8192));
        } else {
            usage("unknown option '" + s + "'");
        }
    }
    if (!have_bundle) {
        usage("BUNDLE_DIR is required");
    }
    return a;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int run(const Args& a) {
    using clock = std::chrono::steady_clock;
    nora::Policy policy(a.bundle, a.options);
    nora::FakeCamera camera(a.height, a.width, a.seed);
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> frames(nullptr, std::fclose);
    if (!a.frames_out.empty()) {
        frames.reset(std::fopen(a.frames_out.c_str(), "wb"));
        if (!frames) {
            throw std::runtime_error(a.frames_out + ": cannot open for writing");
        }
    }
    std::vector<double> action, latency_ms;
    latency_ms.reserve(static_cast<size_t>(a.ticks));
    const auto period = std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(1.0 / a.hz));
    long chunks = 0, overruns = 0;
    const auto start = clock::now();
    for (long tick = 0; tick < a.ticks; tick++) {
        const bool episode_start = a.episode > 0 ? tick % a.episode == 0 : tick == 0;
        if (episode_start) {
            policy.reset();
        }
        const nora::Frame frame = camera.grab();
        const size_t frame_bytes = static_cast<size_t>(frame.height) * frame.stride;
        if (frames && std::fwrite(frame.rgb, 1, frame_bytes, frames.get()) != frame_bytes) {
            throw std::runtime_error(a.frames_out + ": write failed");
        }
        const auto t0 = clock::now();
        const bool fresh = policy.select_action(frame, a.instruction, a.unnorm_key, action);
        const double ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
        latency_ms.push_back(ms);
        chunks += fresh;
        std::printf("{\"tick\": %ld, \"episode_start\": %s, \"new_chunk\": %s, \"latency_ms\": %.6f, \"action\": [",
                    tick, episode_start ? "true" : "false", fresh ? "true" : "false", ms);
        for (size_t d = 0; d < action.size(); d++) {
            std::printf(d ? ", %.17g" : "%.17g", action[d]);
        }
        std::printf("]}\n");
        std::fflush(stdout);
        const auto deadline = start + (tick + 1) * period;
        if (clock::now() > deadline) {
            overruns++;
        } else {
            std::this_thread::sleep_until(deadline);
        }
    }
    if (frames && std::fclose(frames.release()) != 0) {
        throw std::runtime_error(a.frames_out + ": write failed");
    }
    const double worst = *std::max_element(latency_ms.begin(), latency_ms.end());
    std::printf("{\"summary\": {\"ticks\": %ld, \"chunks\": %ld, \"median_ms\": %.6f, \"max_ms\": %.6f, "
                "\"overruns\": %ld, \"hz\": %.17g}}\n",
                a.ticks, chunks, median(latency_ms), worst, overruns, a.hz);
    return std::fflush(stdout) == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    const Args a = parse(argc, argv);
    try {
        return run(a);
    } catch (const nora::Error& e) {
        std::fprintf(stderr, "robot_loop: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "robot_loop: %s\n", e.what());
        return 1;
    }
}
