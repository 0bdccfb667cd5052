// bundle.cpp: libnora_edge's bundle reader (see bundle.h). Mirrors nora_edge/bundle.py (Bundle.load,
// verify_files, list_files), nora_edge/bundle_specs.py (require_field, expand_ranges, *Spec.from_json),
// nora_edge/policy.py (NoraPolicy.load, check_bundle_consistency, _vision_params) and nora_edge/preprocess.py
// (ImageSpec.from_manifest, smart_resize, c_path_unsupported), with their error wording.
// JSON: nlohmann/json's ordered_json (Debian nlohmann-json3-dev; https://json.nlohmann.me/api/ordered_json/),
// so manifest "files" are checked in file order like Python's dict.
#include "edge/bundle.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "edge/bundle_impl.h"
#include "edge/sha256.h"

namespace nora_edge {
namespace detail {

[[noreturn]] void fail(const std::string &msg) { throw BundleError(NORA_EDGE_ERR_BUNDLE, msg); }

std::string repr(const json &v, size_t cut) {
    std::string s;
    if (v.is_null()) s = "None";
    else if (v.is_boolean()) s = v.get<bool>() ? "True" : "False";
    else if (v.is_string()) s = "'" + v.get<std::string>() + "'";
    else s = v.dump();
    return s.size() > cut ? s.substr(0, cut) : s;
}

}  // namespace detail

namespace {

using detail::fail;
using detail::repr;
using detail::json;
using detail::MANIFEST;

enum Kind { INT, NUM, STR, LIST, DICT };
const char *kind_name(Kind k) {
    switch (k) {
        case INT: return "<class 'int'>";
        case NUM: return "(<class 'int'>, <class 'float'>)";
        case STR: return "<class 'str'>";
        case LIST: return "<class 'list'>";
        default: return "<class 'dict'>";
    }
}
bool is_kind(const json &v, Kind k) {
    switch (k) {
        case INT: return v.is_number_integer();  // stricter than Python: a bool is refused
        case NUM: return v.is_number();
        case STR: return v.is_string();
        case LIST: return v.is_array();
        default: return v.is_object();
    }
}

// bundle_specs.require_field
const json &require(const json &d, const std::string &key, const std::string &where, Kind k) {
    if (!d.is_object() || !d.contains(key)) fail(std::string(MANIFEST) + ": missing field '" + where + "." + key + "'");
    const json &v = d.at(key);
    if (!is_kind(v, k))
        fail(std::string(MANIFEST) + ": field '" + where + "." + key + "' = " + repr(v) + " is not " + kind_name(k));
    return v;
}
int64_t req_int(const json &d, const std::string &key, const std::string &where) {
    return require(d, key, where, INT).get<int64_t>();
}
std::string req_str(const json &d, const std::string &key, const std::string &where) {
    return require(d, key, where, STR).get<std::string>();
}
// a list of ints (Python: tuple(int(i) for i in ...); here every item must be a JSON integer)
std::vector<int64_t> req_ids(const json &d, const std::string &key, const std::string &where) {
    std::vector<int64_t> out;
    for (const json &v : require(d, key, where, LIST)) {
        if (!v.is_number_integer())
            fail(std::string(MANIFEST) + ": field '" + where + "." + key + "' holds " + repr(v) + ", not an int");
        out.push_back(v.get<int64_t>());
    }
    return out;
}
// optional int-or-null field: -1 when absent or null
int64_t opt_int(const json &d, const std::string &key, const std::string &where) {
    if (!d.contains(key) || d.at(key).is_null()) return -1;
    return require(d, key, where, INT).get<int64_t>();
}

// bundle_specs.expand_ranges
std::vector<int64_t> expand_ranges(const json &ranges, const std::string &where) {
    std::vector<int64_t> out;
    for (const json &r : ranges) {
        if (!r.is_array() || r.size() != 2 || !r[0].is_number_integer() || !r[1].is_number_integer())
            fail(std::string(MANIFEST) + ": field '" + where + "' must be a list of [start, stop) pairs (" +
                 repr(r) + ")");
        int64_t a = r[0].get<int64_t>(), b = r[1].get<int64_t>();
        if (b - a > (int64_t(1) << 24))
            fail(std::string(MANIFEST) + ": field '" + where + "' range " + repr(r) + " is too long");
        for (int64_t i = a; i < b; i++) out.push_back(i);
    }
    return out;
}

ComponentInfo component(const json &d, const std::string &where, ComponentInfo c) {
    c.file = req_str(d, "file", where);
    if (d.contains("data_files")) {
        for (const json &f : require(d, "data_files", where, LIST)) {
            if (!f.is_string()) fail(std::string(MANIFEST) + ": field '" + where + ".data_files' holds " + repr(f));
            c.data_files.push_back(f.get<std::string>());
        }
    }
    c.precision = req_str(d, "precision", where);
    for (const char *kind : {"inputs", "outputs"}) {
        const std::string w = where + "." + kind;
        for (const json &t : require(d, kind, where, LIST)) {
            TensorInfo ti;
            ti.name = req_str(t, "name", w);
            ti.dtype = req_str(t, "dtype", w);
            for (const json &dim : require(t, "shape", w, LIST)) {
                if (dim.is_number_integer()) {
                    ti.dims.push_back(dim.get<int64_t>());
                    ti.dim_names.emplace_back();
                } else if (dim.is_string()) {
                    ti.dims.push_back(-1);
                    ti.dim_names.push_back(dim.get<std::string>());
                } else {
                    fail(std::string(MANIFEST) + ": field '" + w + ".shape' of '" + ti.name + "' holds " + repr(dim));
                }
            }
            (std::string(kind) == "inputs" ? c.inputs : c.outputs).push_back(std::move(ti));
        }
    }
    return c;
}

const json &meta_of(const json &d, const std::string &where) {
    static const json empty = json::object();
    if (!d.contains("meta")) return empty;
    return require(d, "meta", where, DICT);
}

// ---------------------------------------------------------------- files (bundle.py verify_files / list_files)
bool is_regular(const std::string &p, struct stat *st) { return ::stat(p.c_str(), st) == 0 && S_ISREG(st->st_mode); }

// every entry under root, depth first; sorted afterwards by path components like Python's sorted(rglob("*"))
void walk(const std::string &root, const std::vector<std::string> &rel, std::vector<std::vector<std::string>> &out) {
    std::string dir = root;
    for (const auto &p : rel) dir += "/" + p;
    DIR *d = ::opendir(dir.c_str());
    if (!d) fail(dir + ": cannot list (" + std::strerror(errno) + ")");
    std::vector<std::string> names;
    while (struct dirent *e = ::readdir(d)) {
        std::string n = e->d_name;
        if (n != "." && n != "..") names.push_back(n);
    }
    ::closedir(d);
    for (const auto &n : names) {
        std::vector<std::string> child = rel;
        child.push_back(n);
        out.push_back(child);
        struct stat st;
        std::string p = dir + "/" + n;
        if (::lstat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) walk(root, child, out);  // symlinked dirs: not followed
    }
}

std::string join_rel(const std::vector<std::string> &parts) {
    std::string s;
    for (const auto &p : parts) s += (s.empty() ? "" : "/") + p;
    return s;
}

void verify_files(const std::string &root, const json &files, bool hash_files) {
    const std::string mpath = root + "/" + MANIFEST;
    if (!files.is_object() || files.empty()) fail(mpath + ": section 'files' is empty or not an object");
    for (const auto &item : files.items()) {
        const std::string &rel = item.key();
        const json &entry = item.value();
        // stricter than Python: a listed path may not leave the bundle
        if (rel.empty() || rel[0] == '/' || ("/" + rel + "/").find("/../") != std::string::npos)
            fail(mpath + ": listed path '" + rel + "' leaves the bundle directory");
        if (!entry.is_object()) fail(mpath + ": field 'files." + rel + "' = " + repr(entry) + " is not <class 'dict'>");
        const std::string p = root + "/" + rel;
        struct stat st;
        if (!is_regular(p, &st)) fail(p + ": listed in " + MANIFEST + " but missing");
        const json size = entry.contains("size") ? entry.at("size") : json(nullptr);
        if (!size.is_number_integer() || size.get<int64_t>() != static_cast<int64_t>(st.st_size))
            fail(p + ": size " + std::to_string(st.st_size) + " != " + (size.is_string() ? size.get<std::string>() : repr(size, 1000)) + " recorded in " + MANIFEST +
                 " (tampered?)");
        if (hash_files) {
            char hex[65];
            if (nora_edge_priv_sha256_file(p.c_str(), hex) != 0)
                fail(p + ": cannot read (" + std::strerror(errno) + ")");
            const json sha = entry.contains("sha256") ? entry.at("sha256") : json(nullptr);
            if (!sha.is_string() || sha.get<std::string>() != hex)
                fail(p + ": sha256 does not match " + MANIFEST + " (tampered or corrupted)");
        }
    }
    std::vector<std::vector<std::string>> all;
    walk(root, {}, all);
    std::sort(all.begin(), all.end());
    std::set<std::string> extra;
    for (const auto &parts : all) {
        const std::string rel = join_rel(parts), p = root + "/" + rel;
        struct stat st;
        if (::lstat(p.c_str(), &st) != 0) continue;
        if (S_ISLNK(st.st_mode)) fail(p + ": symlinks are not allowed in a bundle");
        if (S_ISREG(st.st_mode) && rel != MANIFEST && !files.contains(rel)) extra.insert(rel);
    }
    if (!extra.empty())
        fail(root + "/" + *extra.begin() + ": not listed in " + MANIFEST + " (" + std::to_string(extra.size()) +
             " unlisted file(s))");
}

std::string read_file(const std::string &p) {
    std::ifstream f(p, std::ios::binary);
    if (!f) fail("missing file: " + p);
    std::ostringstream ss;
    ss << f.rdbuf();
    if (f.bad()) fail(p + ": not valid JSON (read error)");
    return ss.str();
}

}  // namespace

std::string Bundle::path(const std::string &rel) const { return dir + "/" + rel; }

Bundle Bundle::load(const std::string &dir_in, bool verify_hashes) {
    Bundle b;
    b.dir = dir_in;
    while (b.dir.size() > 1 && b.dir.back() == '/') b.dir.pop_back();
    const std::string &root = b.dir, mpath = root + "/" + MANIFEST;
    struct stat st;
    if (::stat(root.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) fail("bundle directory not found: " + root);
    if (!is_regular(mpath, &st)) fail(mpath + ": missing (incomplete export? the manifest is written last)");
    json m;
    try {
        const std::string text = read_file(mpath);
        m = json::parse(text.begin(), text.end());
    } catch (const json::exception &e) {
        fail(mpath + ": not valid JSON (" + e.what() + ")");
    }
    if (!m.is_object()) fail(mpath + ": expected a JSON object, got " + std::string(m.type_name()));
    const json version = m.contains("schema_version") ? m.at("schema_version") : json(nullptr);
    if (!(version.is_number_integer() && version.get<int64_t>() == 1))
        fail(mpath + ": schema_version " + repr(version) + "; this nora-edge reads 1");
    b.schema_version = 1;
    for (const char *key : {"schema_version", "nora_edge_version", "source_checkpoint", "files", "components", "prompt",
                            "image", "actions", "generation", "codec", "norm_stats", "validation"})
        if (!m.contains(key)) fail(mpath + ": missing section '" + key + "'");
    verify_files(root, m.at("files"), verify_hashes);

    // components (Bundle.load + policy._vision_params + the decoder meta Decoder/StaticDecoder read)
    const json &comps = m.at("components");
    const json &jv = require(comps, "vision", "components", DICT);
    const json &jd = require(comps, "decoder", "components", DICT);
    static_cast<ComponentInfo &>(b.vision) = component(jv, "components.vision", {});
    static_cast<ComponentInfo &>(b.decoder) = component(jd, "components.decoder", {});
    const json &je = require(comps, "embeddings", "components", DICT);
    const json &vm = meta_of(jv, "components.vision");
    b.vision.patch_size = req_int(vm, "patch_size", "components.vision.meta");
    b.vision.spatial_merge_size = req_int(vm, "spatial_merge_size", "components.vision.meta");
    b.vision.window_size = req_int(vm, "window_size", "components.vision.meta");
    if (vm.contains("grid_thw") && !vm.at("grid_thw").is_null()) {
        std::vector<int64_t> g = req_ids(vm, "grid_thw", "components.vision.meta");
        if (g.size() != 3) fail(std::string(MANIFEST) + ": field 'components.vision.meta.grid_thw' must hold 3 ints");
        b.vision.fixed_grid = true;
        std::copy(g.begin(), g.end(), b.vision.grid_thw);
    }
    const json &dm = meta_of(jd, "components.decoder");
    const std::string dw = "components.decoder.meta";
    b.decoder.num_layers = req_int(dm, "num_layers", dw);
    b.decoder.num_kv_heads = req_int(dm, "num_kv_heads", dw);
    b.decoder.head_dim = req_int(dm, "head_dim", dw);
    b.decoder.hidden_size = req_int(dm, "hidden_size", dw);
    if (dm.contains("kv_cache")) b.decoder.kv_cache = req_str(dm, "kv_cache", dw);
    if (dm.contains("graph")) b.decoder.graph = req_str(dm, "graph", dw);
    b.decoder.max_len = opt_int(dm, "max_len", dw);
    b.decoder.num_rows = opt_int(dm, "num_rows", dw);
    if (b.decoder.kv_cache != "" && b.decoder.kv_cache != "static" && b.decoder.kv_cache != "shared")
        fail(std::string(MANIFEST) + ": field '" + dw + ".kv_cache' = '" + b.decoder.kv_cache + "' is not static/shared");
    if (!b.decoder.kv_cache.empty() && b.decoder.max_len <= 0)
        fail(std::string(MANIFEST) + ": missing field '" + dw + ".max_len' (kv_cache '" + b.decoder.kv_cache + "')");
    b.embeddings.file = req_str(je, "file", "components.embeddings");
    b.embeddings.dtype = req_str(je, "dtype", "components.embeddings");
    b.embeddings.shape = req_ids(je, "shape", "components.embeddings");
    if (!m.at("files").contains(b.embeddings.file))  // Bundle.file()
        fail(root + ": '" + b.embeddings.file + "' is not listed in " + MANIFEST);

    // norm_stats keys, codec, postprocess (Bundle.load; the chains themselves are libnora_fast's native.txt)
    const json &ns = m.at("norm_stats");
    if (!ns.is_object()) fail(mpath + " norm_stats: expected an object, got " + repr(ns));
    for (const auto &it : ns.items()) {
        if (!it.value().is_object()) fail(mpath + " norm_stats: '" + it.key() + "' is not an object");
        b.norm_stats_keys.push_back(it.key());
    }
    std::sort(b.norm_stats_keys.begin(), b.norm_stats_keys.end());
    const json &jc = m.at("codec");
    b.codec.scale = require(jc, "scale", "codec", NUM).get<double>();
    b.codec.min_token = req_int(jc, "min_token", "codec");
    b.codec.vocab_size = req_int(jc, "vocab_size", "codec");
    b.codec.time_horizon = req_int(jc, "time_horizon", "codec");
    b.codec.action_dim = req_int(jc, "action_dim", "codec");
    const json &cf = require(jc, "files", "codec", DICT);
    b.codec.byte_table = req_str(cf, "byte_table", "codec.files");
    b.codec.tokenizer = req_str(cf, "tokenizer", "codec.files");
    b.codec.processor_config = req_str(cf, "processor_config", "codec.files");
    if (cf.contains("native")) b.codec.native = req_str(cf, "native", "codec.files");
    if (m.contains("postprocess")) {
        const json &pp = m.at("postprocess");
        if (!pp.is_array()) fail(mpath + ": postprocess: expected a list of steps, got " + repr(pp));
        for (size_t i = 0; i < pp.size(); i++) {
            const std::string w = "postprocess[" + std::to_string(i) + "]";
            PostStep s;
            s.op = req_str(pp[i], "op", w);
            if (pp[i].contains("key") && !pp[i].at("key").is_null()) s.key = req_str(pp[i], "key", w);
            if (pp[i].contains("mode") && !pp[i].at("mode").is_null()) s.mode = req_str(pp[i], "mode", w);
            if (!s.key.empty() && !ns.contains(s.key))
                fail(mpath + ": postprocess: step " + std::to_string(i + 1) + " names unnorm key '" + s.key +
                     "', not in norm_stats");
            b.postprocess.push_back(s);
        }
    }

    // drafts (multitoken.py MultiTokenDecoding.seed_from; the file itself is read by DraftTable::seed at create,
    // only when it seeds). Stricter than Python: a falsy non-object ([], "", 0, false) is refused, not ignored.
    const json &dj = m.contains("drafts") ? m.at("drafts") : json(nullptr);
    if (!dj.is_null() && !(dj.is_object() && dj.empty())) {
        const std::string want = "drafts.json";  // bundle.py DRAFTS
        const bool has_file = dj.is_object() && dj.contains("file");
        if (!has_file || !dj.at("file").is_string() || dj.at("file").get<std::string>() != want)
            fail(mpath + ": 'drafts' section must name file '" + want + "', got " +
                 (dj.is_object() ? (has_file ? repr(dj.at("file")) : "no 'file'") : repr(dj)));
        if (!m.at("files").contains(want))  // Bundle.file()
            fail(root + ": '" + want + "' is not listed in " + MANIFEST);
        b.drafts = want;
    }

    // prompt, actions, generation (bundle_specs.*Spec.from_json)
    const json &jp = m.at("prompt");
    b.prompt.prefix_ids = req_ids(jp, "prefix_ids", "prompt");
    b.prompt.image_pad_id = req_int(jp, "image_pad_id", "prompt");
    b.prompt.vision_start_id = req_int(jp, "vision_start_id", "prompt");
    b.prompt.vision_end_id = req_int(jp, "vision_end_id", "prompt");
    b.prompt.suffix_ids = req_ids(jp, "suffix_ids", "prompt");
    b.prompt.tokenizer = req_str(jp, "tokenizer", "prompt");
    require(jp, "mrope", "prompt", DICT);
    if (jp.contains("max_instruction_tokens"))
        b.prompt.max_instruction_tokens = req_int(jp, "max_instruction_tokens", "prompt");
    b.prompt.spatial_merge_size = b.vision.spatial_merge_size;
    const json &ja = m.at("actions");
    b.actions.base = req_int(ja, "base", "actions");
    b.actions.count = req_int(ja, "count", "actions");
    b.actions.head = req_str(ja, "head", "actions");
    b.actions.head_rows = expand_ranges(require(ja, "head_rows", "actions", LIST), "actions.head_rows");
    b.actions.end_ids = req_ids(ja, "end_ids", "actions");
    b.prompt.forbidden_ids = {b.prompt.image_pad_id, b.prompt.vision_end_id};
    if (jp.contains("forbidden_ids")) {
        for (int64_t id : req_ids(jp, "forbidden_ids", "prompt")) b.prompt.forbidden_ids.push_back(id);
    }
    std::sort(b.prompt.forbidden_ids.begin(), b.prompt.forbidden_ids.end());
    b.prompt.forbidden_ids.erase(std::unique(b.prompt.forbidden_ids.begin(), b.prompt.forbidden_ids.end()),
                                 b.prompt.forbidden_ids.end());
    b.prompt.forbidden_range_begin = b.actions.base;
    b.prompt.forbidden_range_end = b.actions.base + b.actions.count;
    const json &jg = m.at("generation");
    b.generation.eos_token_ids = req_ids(jg, "eos_token_ids", "generation");
    if (jg.contains("repetition_penalty") && !jg.at("repetition_penalty").is_null()) {
        b.generation.has_repetition_penalty = true;
        b.generation.repetition_penalty = require(jg, "repetition_penalty", "generation", NUM).get<double>();
    }
    b.generation.max_new_tokens = opt_int(jg, "max_new_tokens", "generation");
    b.generation.max_length = opt_int(jg, "max_length", "generation");
    b.generation.pad_token_id = opt_int(jg, "pad_token_id", "generation");

    // policy.check_bundle_consistency (norm_stats dims are libnora_fast's native tables' business)
    if (b.codec.vocab_size != b.actions.count)
        fail(std::string(MANIFEST) + ": codec.vocab_size " + std::to_string(b.codec.vocab_size) +
             " != actions.count " + std::to_string(b.actions.count));
    const TensorInfo *logits = nullptr;
    for (const auto &t : b.decoder.outputs)
        if (t.name == "logits" && !logits) logits = &t;
    if (!logits) fail(std::string(MANIFEST) + ": components.decoder has no output 'logits'");
    if (!logits->dims.empty() && logits->dims.back() >= 0 &&
        logits->dims.back() != static_cast<int64_t>(b.actions.head_rows.size()))
        fail(std::string(MANIFEST) + ": decoder logits have " + std::to_string(logits->dims.back()) +
             " rows but actions.head_rows lists " + std::to_string(b.actions.head_rows.size()));

    // image (ImageSpec.from_manifest) + the specialised vision grid check of NoraPolicy.load
    b.image = detail::image_spec(m.at("image"));
    if (b.vision.fixed_grid && !std::equal(b.image.grid_thw, b.image.grid_thw + 3, b.vision.grid_thw)) {
        auto g = [](const int64_t *x) {
            return "[" + std::to_string(x[0]) + ", " + std::to_string(x[1]) + ", " + std::to_string(x[2]) + "]";
        };
        fail("manifest.json: the vision graph is specialised to grid " + g(b.vision.grid_thw) +
             " but the image section gives grid " + g(b.image.grid_thw));
    }
    return b;
}

}  // namespace nora_edge
