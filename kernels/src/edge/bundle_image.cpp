// bundle_image.cpp: the manifest's image section for libnora_edge (see bundle.h, ImageInfo). Mirrors
// nora_edge/preprocess.py: ImageSpec.from_manifest (fields, defaults, wording), smart_resize (Qwen2-VL's size
// rule, transformers' models/qwen2_vl/image_processing_qwen2_vl.py), ImageSpec.output_size (fetch_image's
// resize, then the processor's) and c_path_unsupported (what nora_edge_preprocess cannot reproduce).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <set>
#include <vector>

#include "edge/bundle_impl.h"

namespace nora_edge {
namespace detail {
namespace {

// Qwen2-VL's smart_resize in double precision; Python's round() is round-half-even (nearbyint, FE_TONEAREST)
void smart_resize(int64_t h, int64_t w, int64_t factor, int64_t min_px, int64_t max_px, int64_t &oh, int64_t &ow) {
    if (static_cast<double>(std::max(h, w)) / static_cast<double>(std::min(h, w)) > 200)
        fail(std::string(MANIFEST) + ": image: aspect ratio of " + std::to_string(h) + "x" + std::to_string(w) +
             " exceeds 200");
    const double f = static_cast<double>(factor), hd = static_cast<double>(h), wd = static_cast<double>(w);
    int64_t hb = static_cast<int64_t>(std::nearbyint(hd / f)) * factor;
    int64_t wb = static_cast<int64_t>(std::nearbyint(wd / f)) * factor;
    if (hb * wb > max_px) {
        double beta = std::sqrt((hd * wd) / static_cast<double>(max_px));
        hb = std::max(factor, static_cast<int64_t>(std::floor(hd / beta / f)) * factor);
        wb = std::max(factor, static_cast<int64_t>(std::floor(wd / beta / f)) * factor);
    } else if (hb * wb < min_px) {
        double beta = std::sqrt(static_cast<double>(min_px) / (hd * wd));
        hb = static_cast<int64_t>(std::ceil(hd * beta / f)) * factor;
        wb = static_cast<int64_t>(std::ceil(wd * beta / f)) * factor;
    }
    oh = hb;
    ow = wb;
}

}  // namespace

ImageInfo image_spec(const json &d) {
    const std::string src = "manifest.json: image";
    if (!d.is_object()) fail(src + ": expected an object, got " + repr(d));
    static const std::set<std::string> known = {
        "resized_height", "resized_width", "patch_size", "temporal_patch_size", "merge_size", "min_pixels",
        "max_pixels", "rescale_factor", "image_mean", "image_std", "size", "do_rescale", "do_normalize", "resample"};
    std::vector<std::string> unknown;
    for (const auto &it : d.items())
        if (!known.count(it.key())) unknown.push_back(it.key());
    if (!unknown.empty()) {
        std::sort(unknown.begin(), unknown.end());
        auto pylist = [](const std::vector<std::string> &v) {
            std::string t = "[";
            for (size_t i = 0; i < v.size(); i++) t += (i ? ", '" : "'") + v[i] + "'";
            return t + "]";
        };
        fail(src + ": unknown field(s) " + pylist(unknown) + "; this runtime reads " +
             pylist(std::vector<std::string>(known.begin(), known.end())));
    }
    for (const char *flag : {"do_rescale", "do_normalize"})
        if (d.contains(flag) && d.at(flag) != json(true))
            fail(src + ": field '" + flag + "' = " + repr(d.at(flag)) + "; only true is implemented");
    if (d.contains("resample") && !(d.at("resample").is_number() && d.at("resample").get<double>() == 3.0))
        fail(src + ": field 'resample' = " + repr(d.at("resample")) + "; only 3 (bicubic) is implemented");
    ImageInfo im;
    int64_t v[7] = {224, 224, 14, 2, 2, 56 * 56, 28 * 28 * 1280};
    static const char *ints[7] = {"resized_height", "resized_width", "patch_size", "temporal_patch_size",
                                  "merge_size", "min_pixels", "max_pixels"};
    if (d.contains("size")) {
        const json &s = d.at("size");
        if (s.is_number_integer()) v[0] = v[1] = s.get<int64_t>();
        else if (s.is_array() && s.size() == 2 && s[0].is_number_integer() && s[1].is_number_integer())
            v[0] = s[0].get<int64_t>(), v[1] = s[1].get<int64_t>();
        else if (s.is_object() && s.contains("height") && s.contains("width") && s["height"].is_number_integer() &&
                 s["width"].is_number_integer())
            v[0] = s["height"].get<int64_t>(), v[1] = s["width"].get<int64_t>();
        else fail(src + ": field 'size' = " + repr(s) + "; expected an int, [h, w] or {height, width}");
    }
    for (int i = 0; i < 7; i++) {
        if (!d.contains(ints[i])) continue;
        const json &x = d.at(ints[i]);
        if (!x.is_number_integer() || x.get<int64_t>() <= 0)
            fail(src + ": field '" + ints[i] + "' = " + repr(x) + " must be a positive int");
        v[i] = x.get<int64_t>();
    }
    float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f}, stdv[3] = {0.26862954f, 0.26130258f, 0.27577711f};
    for (const char *key : {"image_mean", "image_std"}) {
        if (!d.contains(key)) continue;
        const json &x = d.at(key);
        bool ok = x.is_array() && x.size() == 3;
        for (size_t i = 0; ok && i < 3; i++) ok = x[i].is_number();
        if (!ok) fail(src + ": field '" + key + "' = " + repr(x) + " must be 3 numbers");
        // Python keeps float64; nora_edge_preprocess takes float32 (edge_lib.make_spec casts the same way)
        for (size_t i = 0; i < 3; i++) (std::strcmp(key, "image_mean") == 0 ? mean : stdv)[i] = x[i].get<float>();
    }
    im.rescale_factor = 1.0 / 255.0;
    if (d.contains("rescale_factor")) {
        if (!d.at("rescale_factor").is_number())
            fail(src + ": field 'rescale_factor' = " + repr(d.at("rescale_factor")) + " must be a number");
        im.rescale_factor = d.at("rescale_factor").get<double>();
    }
    im.resized_height = v[0];
    im.resized_width = v[1];
    im.min_pixels = v[5];
    im.max_pixels = v[6];
    const int64_t factor = v[2] * v[4];
    int64_t h, w, h2, w2;
    smart_resize(v[0], v[1], factor, 4 * 28 * 28, 16384 * 28 * 28, h, w);
    smart_resize(h, w, factor, v[5], v[6], h2, w2);
    // preprocess.c_path_unsupported: the C function resizes once and rescales by 1/255
    if (h2 != h || w2 != w)
        throw BundleError(NORA_EDGE_ERR_UNSUPPORTED,
                          src + ": the image processor resizes " + std::to_string(h) + "x" + std::to_string(w) +
                              " again to " + std::to_string(h2) + "x" + std::to_string(w2) +
                              " (min/max_pixels); C resizes once");
    if (im.rescale_factor != 1.0 / 255.0)
        throw BundleError(NORA_EDGE_ERR_UNSUPPORTED,
                          src + ": rescale_factor " + repr(d.at("rescale_factor")) + " is not 1/255, the C function's");
    if (h2 > INT32_MAX || w2 > INT32_MAX || v[2] > INT32_MAX || v[3] > INT32_MAX || v[4] > INT32_MAX)
        fail(src + ": sizes exceed int32");
    im.spec.height = static_cast<int32_t>(h2);
    im.spec.width = static_cast<int32_t>(w2);
    im.spec.patch_size = static_cast<int32_t>(v[2]);
    im.spec.temporal_patch_size = static_cast<int32_t>(v[3]);
    im.spec.merge_size = static_cast<int32_t>(v[4]);
    for (int i = 0; i < 3; i++) im.spec.mean[i] = mean[i], im.spec.std[i] = stdv[i];
    im.grid_thw[0] = 1;
    im.grid_thw[1] = h2 / v[2];
    im.grid_thw[2] = w2 / v[2];
    return im;
}

}  // namespace detail
}  // namespace nora_edge
