/*
 * A scripted stand-in for libnvidia-ml.so.1, so that nodeward's GPU source can be tested on
 * machines without an NVIDIA GPU. The tests compile it with `cc -shared -fPIC` and load it
 * through the agent's `gpu.library` setting.
 *
 * Script: a `key = value` file, named by $FAKE_NVML_SCRIPT or, when that is unset, the file
 * `fake_nvml.script` next to this library (so parallel tests, each with its own copy of the
 * library, never share a script). It is re-read when it changes (inode, size or mtime), at
 * nvmlInit, nvmlDeviceGetCount and while waiting for events: write a new one and rename it
 * over the old to change what the "driver" reports mid-test.
 *
 * Keys (absent means NVML_ERROR_NOT_SUPPORTED unless noted):
 *   init = <rc>                 return code of nvmlInit_v2 (default 0; 18 = version mismatch);
 *                               `hang`: nvmlInit_v2 does not return while the script says so
 *                               (re-read every 100 ms), as a driver stuck in the kernel; write
 *                               a script without it to let the call go on
 *   driver_version, nvml_version    strings (defaults "999.99.99", "12.999.99")
 *   devices = N                 device count (default 1), at most 64; `ERR:<rc>` makes
 *                               nvmlDeviceGetCount_v2 itself fail (the whole library failing)
 *   record_calls = 1            keep `fake_nvml.calls` next to the script up to date: lines
 *                               `init N`, `shutdown N`, `count N` (calls so far; the counts
 *                               carry over when the library is unloaded and loaded again)
 *   events = D:xid:N D:sbe D:dbe ...  events delivered in order, each once
 *   event_wait_rc = <rc>        make nvmlEventSetWait_v2 fail with rc (e.g. 15, GPU lost)
 *   dev.<i>.<field> / all.<field>   a device's value; `all.` applies to every device
 * Values: a number (or string), `NS` (NOT_SUPPORTED), `ERR:<rc>`, `LOST` (GPU_IS_LOST).
 * Device fields: lost (1: every call on the device returns GPU_IS_LOST), name, uuid, bus_id
 * (these three have generated defaults), util.gpu, util.mem (0 when only util.gpu is set), mem.total, mem.used, mem.free,
 * temp, power, power_limit, clock.graphics|sm|mem|video, throttle, ecc.mode,
 * ecc.corrected.volatile|aggregate, ecc.uncorrected.volatile|aggregate,
 * retired.sbe, retired.dbe (page counts), retired.pending, remap (corr,unc,pending,failed),
 * pcie_replay, nvlink.<l>.state, nvlink.<l>.replay|recovery|crc_flit|crc_data,
 * enc.util, dec.util, enc.stats (sessions,fps,latency_us),
 * procs.compute, procs.graphics (`pid:bytes ...`, empty value = none),
 * procutil (`pid:sm:mem:enc:dec[:timestamp] ...`), register (rc of nvmlDeviceRegisterEvents,
 * default 0), handle (rc of nvmlDeviceGetHandleByIndex_v2, e.g. `ERR:999`: the device is
 * counted but cannot be opened).
 *
 * MIG (Multi-Instance GPU): `dev.<i>.mig.mode = 1` turns MIG mode on for device i (0: off;
 * absent: the device does not support MIG, NOT_SUPPORTED), `dev.<i>.mig.max` is what
 * nvmlDeviceGetMaxMigDeviceCount answers (default 7) and `dev.<i>.mig.count = N` creates MIG
 * devices 0..N-1 (only while MIG mode is on; other indices answer NOT_FOUND, as the driver
 * does for an index without an instance). Each MIG device reads its own keys
 * `dev.<i>.mig.<k>.<field>`: uuid (default `MIG-fake<i>-0000-4000-8000-<k>`), name, gi, ci
 * (defaults k+1 and 0), mem.total, mem.used, and `handle` (rc of its handle, e.g. `ERR:999`);
 * fields a MIG device is not given are NOT_SUPPORTED. As on a real driver, with MIG mode on
 * the parent's nvmlDeviceGetUtilizationRates and nvmlDeviceGetProcessUtilization answer
 * NOT_SUPPORTED whatever the script says; nvmlDeviceGetGpuInstanceId and
 * nvmlDeviceGetComputeInstanceId on a parent handle answer INVALID_ARGUMENT.
 *
 * Changes over time: rewrite the script (see above), or put them in the script itself with a
 * line `@count N`: the lines after it (up to the next `@count`) apply only once
 * nvmlDeviceGetCount_v2 has been called N times or more, and, being later in the file, win
 * over earlier lines. `@count 0` goes back to "always". The agent's source calls
 * nvmlDeviceGetCount_v2 once when it opens NVML, once when it registers for events, and once
 * per poll; a test that polls a `Gpu` itself without events knows exactly which poll is which.
 * Example: `all.temp = 50`, `@count 3`, `all.temp = ERR:999`, `@count 5`, `all.temp = 51`:
 * polls 2..3 (calls 3 and 4) read an error, every later poll 51.
 *
 * Build with -DFAKE_OMIT_INIT to leave nvmlInit_v2 out (a library missing symbols), or
 * -DFAKE_OMIT_ENCODER_STATS to leave nvmlDeviceGetEncoderStats out (an older driver).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

typedef int nvmlReturn_t;
#define OK 0
#define E_INVALID 2
#define E_NOT_SUPPORTED 3
#define E_NOT_FOUND 6
#define E_INSUFFICIENT_SIZE 7
#define E_TIMEOUT 10
#define E_GPU_IS_LOST 15
#define E_UNKNOWN 999

#define MAX_DEVICES 64
#define MAX_MIG 16
#define MAX_ENTRIES 4096
#define MAX_EVENTS 1024

/* A GPU (`mig` < 0) or MIG device `mig` of GPU `index`. */
struct fake_dev { unsigned index; int mig; };
typedef struct fake_dev *nvmlDevice_t;
struct fake_set { unsigned long long registered[MAX_DEVICES]; };
typedef struct fake_set *nvmlEventSet_t;

typedef struct { char busIdLegacy[16]; unsigned domain, bus, device, pciDeviceId, pciSubSystemId; char busId[32]; } nvmlPciInfo_t;
typedef struct { unsigned gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned pid; unsigned long long usedGpuMemory; unsigned gpuInstanceId, computeInstanceId; } nvmlProcessInfo_t;
typedef struct { unsigned pid; unsigned long long timeStamp; unsigned smUtil, memUtil, encUtil, decUtil; } nvmlProcessUtilizationSample_t;
typedef struct { nvmlDevice_t device; unsigned long long eventType, eventData; unsigned gpuInstanceId, computeInstanceId; } nvmlEventData_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct fake_dev devs[MAX_DEVICES];
static struct fake_dev migs[MAX_DEVICES][MAX_MIG];
static char keys[MAX_ENTRIES][64];
static char vals[MAX_ENTRIES][512];
static unsigned long long from_count[MAX_ENTRIES]; /* `@count N` in force for each entry */
static int n_entries;
/* Calls so far, for `@count` and `record_calls`. */
static unsigned long long n_init, n_shutdown, n_count;
static int counts_loaded;
static struct stat last_stat;
static int have_stat;
static int delivered; /* events already handed out */

static const char *script_path(void) {
    static char path[4096];
    const char *env = getenv("FAKE_NVML_SCRIPT");
    if (env && *env) return env;
    Dl_info info;
    if (!dladdr((void *)script_path, &info) || !info.dli_fname) return NULL;
    snprintf(path, sizeof path, "%s", info.dli_fname);
    char *slash = strrchr(path, '/');
    if (!slash) return "fake_nvml.script";
    snprintf(slash + 1, sizeof path - (size_t)(slash + 1 - path), "fake_nvml.script");
    return path;
}

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r')) *--e = 0;
    return s;
}

/* Re-reads the script if it changed. Caller holds the lock. */
static void reload(void) {
    const char *path = script_path();
    struct stat st;
    if (!path || stat(path, &st) != 0) {
        if (have_stat) { n_entries = 0; have_stat = 0; }
        return;
    }
    if (have_stat && st.st_ino == last_stat.st_ino && st.st_size == last_stat.st_size &&
        st.st_mtim.tv_sec == last_stat.st_mtim.tv_sec && st.st_mtim.tv_nsec == last_stat.st_mtim.tv_nsec)
        return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    last_stat = st;
    have_stat = 1;
    n_entries = 0;
    char line[1024];
    unsigned long long from = 0;
    while (fgets(line, sizeof line, f) && n_entries < MAX_ENTRIES) {
        char *l = trim(line);
        if (!*l || *l == '#') continue;
        if (strncmp(l, "@count", 6) == 0) {
            from = strtoull(l + 6, NULL, 10);
            continue;
        }
        from_count[n_entries] = from;
        char *eq = strchr(l, '=');
        if (!eq) continue;
        *eq = 0;
        snprintf(keys[n_entries], sizeof keys[0], "%s", trim(l));
        snprintf(vals[n_entries], sizeof vals[0], "%s", trim(eq + 1));
        n_entries++;
    }
    fclose(f);
}

static const char *global(const char *key) {
    for (int i = n_entries - 1; i >= 0; i--)
        if (from_count[i] <= n_count && strcmp(keys[i], key) == 0) return vals[i];
    return NULL;
}

static const char *field(unsigned dev, const char *name) {
    char k[64];
    snprintf(k, sizeof k, "dev.%u.%s", dev, name);
    const char *v = global(k);
    if (v) return v;
    snprintf(k, sizeof k, "all.%s", name);
    return global(k);
}

static int is_mig_handle(nvmlDevice_t d) {
    return d && d >= &migs[0][0] && d < &migs[0][0] + MAX_DEVICES * MAX_MIG;
}

/* A field of a handle: a GPU's `dev.<i>.` / `all.` keys, a MIG device's `dev.<i>.mig.<k>.`. */
static const char *handle_field(nvmlDevice_t d, const char *name) {
    if (!is_mig_handle(d)) return field(d->index, name);
    char k[96];
    snprintf(k, sizeof k, "dev.%u.mig.%d.%s", d->index, d->mig, name);
    return global(k);
}

/* The return code a value stands for, and its number in *out. */
static nvmlReturn_t parse_u64(const char *v, unsigned long long *out) {
    if (!v || strcmp(v, "NS") == 0) return E_NOT_SUPPORTED;
    if (strcmp(v, "LOST") == 0) return E_GPU_IS_LOST;
    if (strncmp(v, "ERR:", 4) == 0) return (nvmlReturn_t)atoi(v + 4);
    *out = strtoull(v, NULL, 0);
    return OK;
}

static unsigned device_count(void) {
    unsigned long long n = 1;
    if (parse_u64(global("devices"), &n) != OK) n = 1;
    return n > MAX_DEVICES ? MAX_DEVICES : (unsigned)n;
}

/* The GPU a handle belongs to (its parent, for a MIG device); a lost GPU answers LOST for
 * its MIG devices too. */
static nvmlReturn_t dev_index(nvmlDevice_t d, unsigned *idx) {
    if (!d || ((d < devs || d >= devs + MAX_DEVICES) && !is_mig_handle(d))) return E_INVALID;
    *idx = d->index;
    unsigned long long lost = 0;
    if (parse_u64(field(*idx, "lost"), &lost) == OK && lost) return E_GPU_IS_LOST;
    return OK;
}

/* Reads one numeric device field under the lock. */
static nvmlReturn_t dev_u64(nvmlDevice_t d, const char *name, unsigned long long *out) {
    pthread_mutex_lock(&lock);
    unsigned i;
    nvmlReturn_t rc = dev_index(d, &i);
    if (rc == OK) rc = parse_u64(handle_field(d, name), out);
    pthread_mutex_unlock(&lock);
    return rc;
}

static nvmlReturn_t dev_uint(nvmlDevice_t d, const char *name, unsigned *out) {
    unsigned long long v = 0;
    nvmlReturn_t rc = dev_u64(d, name, &v);
    if (rc == OK) *out = (unsigned)v;
    return rc;
}

/* A device string field into buf; `fallback` is used when the key is absent. */
static nvmlReturn_t dev_str(nvmlDevice_t d, const char *name, const char *fallback_fmt, char *buf, unsigned len) {
    pthread_mutex_lock(&lock);
    unsigned i;
    nvmlReturn_t rc = dev_index(d, &i);
    if (rc == OK) {
        const char *v = handle_field(d, name);
        unsigned long long dummy;
        if (v && (strcmp(v, "NS") == 0 || strcmp(v, "LOST") == 0 || strncmp(v, "ERR:", 4) == 0))
            rc = parse_u64(v, &dummy);
        else if (v)
            snprintf(buf, len, "%s", v);
        else if (is_mig_handle(d) && strcmp(name, "uuid") == 0)
            snprintf(buf, len, "MIG-fake%04u-0000-4000-8000-%012d", i, d->mig);
        else if (is_mig_handle(d))
            rc = E_NOT_SUPPORTED;
        else
            snprintf(buf, len, fallback_fmt, i);
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

/* Parses "a,b,c,d" into up to n numbers. */
static nvmlReturn_t dev_tuple(nvmlDevice_t d, const char *name, unsigned long long *out, int n) {
    pthread_mutex_lock(&lock);
    unsigned i;
    nvmlReturn_t rc = dev_index(d, &i);
    const char *v = rc == OK ? handle_field(d, name) : NULL;
    if (rc == OK) {
        unsigned long long first;
        rc = parse_u64(v, &first);
    }
    if (rc == OK) {
        const char *p = v;
        for (int k = 0; k < n; k++) {
            char *end;
            out[k] = strtoull(p, &end, 0);
            p = (*end == ',') ? end + 1 : end;
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

/* `fake_nvml.calls`, next to the script. */
static const char *calls_path(void) {
    static char path[4200];
    const char *script = script_path();
    if (!script) return NULL;
    snprintf(path, sizeof path, "%s", script);
    char *slash = strrchr(path, '/');
    char *name = slash ? slash + 1 : path;
    snprintf(name, sizeof path - (size_t)(name - path), "fake_nvml.calls");
    return path;
}

/* Picks the counts up from a previous load of the library. Caller holds the lock. */
static void load_counts(void) {
    if (counts_loaded) return;
    counts_loaded = 1;
    const char *path = calls_path();
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) return;
    char name[32];
    unsigned long long v;
    while (fscanf(f, "%31s %llu", name, &v) == 2) {
        if (strcmp(name, "init") == 0) n_init = v;
        else if (strcmp(name, "shutdown") == 0) n_shutdown = v;
        else if (strcmp(name, "count") == 0) n_count = v;
    }
    fclose(f);
}

/* Writes the counts when the script asks for them. Caller holds the lock. */
static void record_calls(void) {
    unsigned long long on = 0;
    if (parse_u64(global("record_calls"), &on) != OK || !on) return;
    const char *path = calls_path();
    if (!path) return;
    char tmp[4300];
    snprintf(tmp, sizeof tmp, "%s.new", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "init %llu\nshutdown %llu\ncount %llu\n", n_init, n_shutdown, n_count);
    fclose(f);
    rename(tmp, path);
}

/* ---- library and system ---- */

#ifndef FAKE_OMIT_INIT
nvmlReturn_t nvmlInit_v2(void) {
    pthread_mutex_lock(&lock);
    load_counts();
    n_init++;
    reload();
    record_calls();
    for (unsigned i = 0; i < MAX_DEVICES; i++) {
        devs[i].index = i;
        devs[i].mig = -1;
        for (int k = 0; k < MAX_MIG; k++) { migs[i][k].index = i; migs[i][k].mig = k; }
    }
    const char *v = global("init");
    while (v && strcmp(v, "hang") == 0) {
        /* Let go of the lock while hanging, as a call stuck in the driver holds no lock of
         * the library's callers. */
        pthread_mutex_unlock(&lock);
        struct timespec step = {0, 100 * 1000 * 1000};
        nanosleep(&step, NULL);
        pthread_mutex_lock(&lock);
        reload();
        v = global("init");
    }
    unsigned long long rc = 0;
    if (v) rc = strtoull(v, NULL, 0);
    pthread_mutex_unlock(&lock);
    return (nvmlReturn_t)rc;
}
nvmlReturn_t nvmlInitWithFlags(unsigned flags) { (void)flags; return nvmlInit_v2(); }
#endif

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    load_counts();
    n_shutdown++;
    record_calls();
    pthread_mutex_unlock(&lock);
    return OK;
}

const char *nvmlErrorString(nvmlReturn_t rc) {
    switch (rc) {
    case OK: return "Success";
    case E_NOT_SUPPORTED: return "Not Supported";
    case E_GPU_IS_LOST: return "GPU is lost";
    case E_TIMEOUT: return "Timeout";
    case 18: return "RM has detected an NVML/RM version mismatch";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t sys_string(const char *key, const char *fallback, char *buf, unsigned len) {
    pthread_mutex_lock(&lock);
    const char *v = global(key);
    snprintf(buf, len, "%s", v ? v : fallback);
    pthread_mutex_unlock(&lock);
    return OK;
}
nvmlReturn_t nvmlSystemGetDriverVersion(char *buf, unsigned len) { return sys_string("driver_version", "999.99.99", buf, len); }
nvmlReturn_t nvmlSystemGetNVMLVersion(char *buf, unsigned len) { return sys_string("nvml_version", "12.999.99", buf, len); }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count) {
    pthread_mutex_lock(&lock);
    load_counts();
    n_count++;
    reload();
    record_calls();
    unsigned long long n = 0;
    const char *v = global("devices");
    nvmlReturn_t rc = v ? parse_u64(v, &n) : OK;
    if (rc == OK) *count = device_count();
    pthread_mutex_unlock(&lock);
    return rc;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *device) {
    pthread_mutex_lock(&lock);
    nvmlReturn_t rc = index < device_count() ? OK : E_INVALID;
    if (rc == OK) {
        unsigned long long lost = 0, dummy = 0;
        const char *h = field(index, "handle");
        if (parse_u64(field(index, "lost"), &lost) == OK && lost) rc = E_GPU_IS_LOST;
        else if (h) rc = parse_u64(h, &dummy);
        *device = &devs[index];
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

/* ---- identity ---- */

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *buf, unsigned len) { return dev_str(d, "name", "Fake GPU %u", buf, len); }
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *buf, unsigned len) { return dev_str(d, "uuid", "GPU-fake0000-0000-0000-0000-%012u", buf, len); }
nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned *index) {
    pthread_mutex_lock(&lock);
    nvmlReturn_t rc = dev_index(d, index);
    pthread_mutex_unlock(&lock);
    return rc;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *pci) {
    char bus_id[32];
    nvmlReturn_t rc = dev_str(d, "bus_id", "00000000:%02X:00.0", bus_id, sizeof bus_id);
    if (rc != OK) return rc;
    memset(pci, 0, sizeof *pci);
    snprintf(pci->busId, sizeof pci->busId, "%s", bus_id);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%.15s", bus_id + (strlen(bus_id) > 12 ? 4 : 0));
    pci->bus = d->index;
    pci->pciDeviceId = 0x20b010de;
    return OK;
}

/* ---- utilisation, memory, thermals, power, clocks ---- */

/* Whether MIG mode is on for the GPU of a parent handle. Caller holds the lock. */
static int mig_on(unsigned i) {
    unsigned long long on = 0;
    return parse_u64(field(i, "mig.mode"), &on) == OK && on;
}

static int parent_in_mig_mode(nvmlDevice_t d) {
    if (is_mig_handle(d)) return 0;
    pthread_mutex_lock(&lock);
    unsigned i;
    int on = dev_index(d, &i) == OK && mig_on(i);
    pthread_mutex_unlock(&lock);
    return on;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    /* As the driver: no device utilisation on a GPU in MIG mode. */
    if (parent_in_mig_mode(d)) return E_NOT_SUPPORTED;
    /* One call returns both; util.mem defaults to 0 once util.gpu is set. */
    nvmlReturn_t rc = dev_uint(d, "util.gpu", &u->gpu);
    if (rc == OK && dev_uint(d, "util.mem", &u->memory) != OK) u->memory = 0;
    return rc;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    nvmlReturn_t rc = dev_u64(d, "mem.total", &m->total);
    if (rc == OK) rc = dev_u64(d, "mem.used", &m->used);
    if (rc == OK && dev_u64(d, "mem.free", &m->free) != OK) m->free = m->total - m->used;
    m->reserved = 0;
    return rc;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned *t) {
    return sensor == 0 ? dev_uint(d, "temp", t) : E_INVALID;
}
nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned *mw) { return dev_uint(d, "power", mw); }
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t d, unsigned *mw) { return dev_uint(d, "power_limit", mw); }
nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t d, unsigned *mw) { return dev_uint(d, "power_limit", mw); }

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned *mhz) {
    static const char *names[] = {"clock.graphics", "clock.sm", "clock.mem", "clock.video"};
    if (type < 0 || type > 3) return E_INVALID;
    return dev_uint(d, names[type], mhz);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t d, unsigned long long *r) { return dev_u64(d, "throttle", r); }
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t d, unsigned long long *r) { return dev_u64(d, "throttle", r); }

/* ---- ECC, retired pages, row remapping, PCIe ---- */

nvmlReturn_t nvmlDeviceGetEccMode(nvmlDevice_t d, int *current, int *pending) {
    unsigned v = 0;
    nvmlReturn_t rc = dev_uint(d, "ecc.mode", &v);
    if (rc == OK) { *current = v ? 1 : 0; *pending = *current; }
    return rc;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t d, int error_type, int counter_type, unsigned long long *count) {
    static const char *names[2][2] = {
        {"ecc.corrected.volatile", "ecc.corrected.aggregate"},
        {"ecc.uncorrected.volatile", "ecc.uncorrected.aggregate"},
    };
    if (error_type < 0 || error_type > 1 || counter_type < 0 || counter_type > 1) return E_INVALID;
    return dev_u64(d, names[error_type][counter_type], count);
}

static nvmlReturn_t retired(nvmlDevice_t d, int cause, unsigned *count, unsigned long long *addrs, unsigned long long *stamps) {
    unsigned n = 0;
    nvmlReturn_t rc = dev_uint(d, cause == 0 ? "retired.sbe" : "retired.dbe", &n);
    if (rc != OK) return rc;
    if (*count < n || (!addrs && n)) { *count = n; return E_INSUFFICIENT_SIZE; }
    for (unsigned k = 0; k < n; k++) {
        addrs[k] = 0x1000ULL * (k + 1);
        if (stamps) stamps[k] = 1700000000ULL + k;
    }
    *count = n;
    return OK;
}
nvmlReturn_t nvmlDeviceGetRetiredPages(nvmlDevice_t d, int cause, unsigned *count, unsigned long long *addrs) {
    return retired(d, cause, count, addrs, NULL);
}
nvmlReturn_t nvmlDeviceGetRetiredPages_v2(nvmlDevice_t d, int cause, unsigned *count, unsigned long long *addrs, unsigned long long *stamps) {
    return retired(d, cause, count, addrs, stamps);
}
nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t d, int *pending) {
    unsigned v = 0;
    nvmlReturn_t rc = dev_uint(d, "retired.pending", &v);
    if (rc == OK) *pending = v ? 1 : 0;
    return rc;
}

nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t d, unsigned *corr, unsigned *unc, unsigned *pending, unsigned *failed) {
    unsigned long long v[4] = {0};
    nvmlReturn_t rc = dev_tuple(d, "remap", v, 4);
    if (rc == OK) { *corr = (unsigned)v[0]; *unc = (unsigned)v[1]; *pending = (unsigned)v[2]; *failed = (unsigned)v[3]; }
    return rc;
}

nvmlReturn_t nvmlDeviceGetPcieReplayCounter(nvmlDevice_t d, unsigned *v) { return dev_uint(d, "pcie_replay", v); }

/* ---- NVLink ---- */

nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t d, unsigned link, int *active) {
    char k[48];
    unsigned v = 0;
    if (link >= 18) return E_INVALID;
    snprintf(k, sizeof k, "nvlink.%u.state", link);
    nvmlReturn_t rc = dev_uint(d, k, &v);
    if (rc == OK) *active = v ? 1 : 0;
    return rc;
}

nvmlReturn_t nvmlDeviceGetNvLinkErrorCounter(nvmlDevice_t d, unsigned link, int counter, unsigned long long *v) {
    static const char *names[] = {"replay", "recovery", "crc_flit", "crc_data", "ecc_data"};
    char k[48];
    if (link >= 18 || counter < 0 || counter > 4) return E_INVALID;
    snprintf(k, sizeof k, "nvlink.%u.%s", link, names[counter]);
    return dev_u64(d, k, v);
}

/* ---- media engines ---- */

nvmlReturn_t nvmlDeviceGetEncoderUtilization(nvmlDevice_t d, unsigned *util, unsigned *period_us) {
    nvmlReturn_t rc = dev_uint(d, "enc.util", util);
    if (rc == OK) *period_us = 167000;
    return rc;
}
nvmlReturn_t nvmlDeviceGetDecoderUtilization(nvmlDevice_t d, unsigned *util, unsigned *period_us) {
    nvmlReturn_t rc = dev_uint(d, "dec.util", util);
    if (rc == OK) *period_us = 167000;
    return rc;
}
#ifndef FAKE_OMIT_ENCODER_STATS
nvmlReturn_t nvmlDeviceGetEncoderStats(nvmlDevice_t d, unsigned *sessions, unsigned *fps, unsigned *latency_us) {
    unsigned long long v[3] = {0};
    nvmlReturn_t rc = dev_tuple(d, "enc.stats", v, 3);
    if (rc == OK) { *sessions = (unsigned)v[0]; *fps = (unsigned)v[1]; *latency_us = (unsigned)v[2]; }
    return rc;
}
#endif

/* ---- processes ---- */

static nvmlReturn_t processes(nvmlDevice_t d, const char *name, unsigned *count, nvmlProcessInfo_t *out) {
    pthread_mutex_lock(&lock);
    unsigned i;
    nvmlReturn_t rc = dev_index(d, &i);
    const char *v = rc == OK ? handle_field(d, name) : NULL;
    unsigned long long dummy;
    if (rc == OK && (!v || strcmp(v, "NS") == 0 || strcmp(v, "LOST") == 0 || strncmp(v, "ERR:", 4) == 0))
        rc = parse_u64(v, &dummy);
    unsigned n = 0;
    if (rc == OK) {
        const char *p = v;
        while (*p) {
            char *end;
            unsigned long pid = strtoul(p, &end, 10);
            if (end == p) break;
            unsigned long long mem = 0;
            if (*end == ':') mem = strtoull(end + 1, &end, 10);
            if (out && n < *count) {
                out[n].pid = (unsigned)pid;
                out[n].usedGpuMemory = mem;
                out[n].gpuInstanceId = 0xFFFFFFFFu;
                out[n].computeInstanceId = 0xFFFFFFFFu;
            }
            n++;
            p = end;
            while (*p == ' ') p++;
        }
        if (!out || n > *count) rc = n ? E_INSUFFICIENT_SIZE : OK;
        *count = n;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned *count, nvmlProcessInfo_t *out) {
    return processes(d, "procs.compute", count, out);
}
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t d, unsigned *count, nvmlProcessInfo_t *out) {
    return processes(d, "procs.graphics", count, out);
}

nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t d, nvmlProcessUtilizationSample_t *out, unsigned *count, unsigned long long last_seen) {
    pthread_mutex_lock(&lock);
    unsigned i;
    nvmlReturn_t rc = dev_index(d, &i);
    /* As the driver: no per-process samples on a GPU in MIG mode, nor on a MIG device. */
    if (rc == OK && (is_mig_handle(d) || mig_on(i))) rc = E_NOT_SUPPORTED;
    const char *v = rc == OK ? field(i, "procutil") : NULL;
    unsigned long long dummy;
    if (rc == OK && (!v || strcmp(v, "NS") == 0 || strcmp(v, "LOST") == 0 || strncmp(v, "ERR:", 4) == 0))
        rc = parse_u64(v, &dummy);
    unsigned n = 0;
    if (rc == OK) {
        const char *p = v;
        while (*p) {
            unsigned long long f[6] = {0, 0, 0, 0, 0, 1};
            char *end = (char *)p;
            for (int k = 0; k < 6; k++) {
                f[k] = strtoull(p, &end, 10);
                if (*end != ':') break;
                p = end + 1;
            }
            if (end == p && f[0] == 0) break;
            if (f[5] > last_seen) {
                if (out && n < *count) {
                    out[n].pid = (unsigned)f[0];
                    out[n].smUtil = (unsigned)f[1];
                    out[n].memUtil = (unsigned)f[2];
                    out[n].encUtil = (unsigned)f[3];
                    out[n].decUtil = (unsigned)f[4];
                    out[n].timeStamp = f[5];
                }
                n++;
            }
            p = end;
            while (*p == ' ') p++;
        }
        if (!out || n > *count) rc = n ? E_INSUFFICIENT_SIZE : E_NOT_FOUND;
        *count = n;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

/* ---- MIG ---- */

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned *current, unsigned *pending) {
    if (is_mig_handle(d)) return E_NOT_SUPPORTED;
    unsigned long long on = 0;
    nvmlReturn_t rc = dev_u64(d, "mig.mode", &on);
    if (rc == OK) { *current = on ? 1 : 0; *pending = *current; }
    return rc;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t d, unsigned *count) {
    if (is_mig_handle(d)) return E_NOT_SUPPORTED;
    pthread_mutex_lock(&lock);
    unsigned i;
    unsigned long long mode = 0, max = 7;
    nvmlReturn_t rc = dev_index(d, &i);
    if (rc == OK) rc = parse_u64(field(i, "mig.mode"), &mode);
    if (rc == OK && parse_u64(field(i, "mig.max"), &max) != OK) max = 7;
    if (rc == OK) *count = (unsigned)max;
    pthread_mutex_unlock(&lock);
    return rc;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t d, unsigned index, nvmlDevice_t *mig) {
    if (is_mig_handle(d)) return E_INVALID;
    pthread_mutex_lock(&lock);
    unsigned i;
    unsigned long long n = 0, dummy = 0;
    nvmlReturn_t rc = dev_index(d, &i);
    if (rc == OK && !mig_on(i)) rc = E_NOT_SUPPORTED;
    if (rc == OK && (parse_u64(field(i, "mig.count"), &n) != OK || index >= n || index >= MAX_MIG))
        rc = E_NOT_FOUND;
    if (rc == OK) {
        char k[64];
        snprintf(k, sizeof k, "dev.%u.mig.%u.handle", i, index);
        const char *h = global(k);
        if (h) rc = parse_u64(h, &dummy);
        *mig = &migs[i][index];
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t d, unsigned *is_mig) {
    *is_mig = is_mig_handle(d) ? 1 : 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t d, nvmlDevice_t *parent) {
    if (!is_mig_handle(d)) return E_INVALID;
    *parent = &devs[d->index];
    return OK;
}

static nvmlReturn_t instance_id(nvmlDevice_t d, const char *name, unsigned fallback, unsigned *id) {
    if (!is_mig_handle(d)) return E_INVALID;
    pthread_mutex_lock(&lock);
    unsigned i;
    unsigned long long v = fallback;
    nvmlReturn_t rc = dev_index(d, &i);
    const char *s = rc == OK ? handle_field(d, name) : NULL;
    if (rc == OK && s) rc = parse_u64(s, &v);
    if (rc == OK) *id = (unsigned)v;
    pthread_mutex_unlock(&lock);
    return rc;
}
nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t d, unsigned *id) {
    return instance_id(d, "gi", is_mig_handle(d) ? (unsigned)d->mig + 1 : 0, id);
}
nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t d, unsigned *id) {
    return instance_id(d, "ci", 0, id);
}

/* ---- events ---- */

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    *set = calloc(1, sizeof **set);
    return *set ? OK : E_UNKNOWN;
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) { free(set); return OK; }

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t d, unsigned long long *types) {
    pthread_mutex_lock(&lock);
    unsigned i;
    nvmlReturn_t rc = dev_index(d, &i);
    pthread_mutex_unlock(&lock);
    if (rc == OK) *types = 1 | 2 | 8;
    return rc;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types, nvmlEventSet_t set) {
    pthread_mutex_lock(&lock);
    unsigned i;
    nvmlReturn_t rc = dev_index(d, &i);
    if (rc == OK) {
        unsigned long long v = 0;
        const char *r = field(i, "register");
        if (r) rc = parse_u64(r, &v) == OK ? (nvmlReturn_t)v : parse_u64(r, &v);
        if (rc == OK) set->registered[i] |= types;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

/* The next undelivered event for this set, if any. Caller holds the lock. */
static int next_event(nvmlEventSet_t set, nvmlEventData_t *data) {
    const char *v = global("events");
    if (!v) return 0;
    int k = 0;
    const char *p = v;
    while (*p) {
        char tok[64];
        int len = 0;
        while (*p == ' ') p++;
        while (*p && *p != ' ' && len < 63) tok[len++] = *p++;
        tok[len] = 0;
        if (!len) break;
        if (k++ < delivered) continue;
        delivered++;
        unsigned dev = 0;
        char kind[16] = {0};
        unsigned long long xid = 0;
        if (sscanf(tok, "%u:%15[a-z]:%llu", &dev, kind, &xid) < 2 || dev >= MAX_DEVICES) continue;
        unsigned long long type = strcmp(kind, "xid") == 0 ? 8 : strcmp(kind, "sbe") == 0 ? 1 : strcmp(kind, "dbe") == 0 ? 2 : 0;
        if (!(set->registered[dev] & type)) continue;
        memset(data, 0, sizeof *data);
        data->device = &devs[dev];
        data->eventType = type;
        data->eventData = type == 8 ? xid : 0;
        return 1;
    }
    return 0;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned timeout_ms) {
    struct timespec step = {0, 5 * 1000 * 1000};
    for (unsigned waited = 0;; waited += 5) {
        pthread_mutex_lock(&lock);
        reload();
        unsigned long long rc = 0;
        nvmlReturn_t result = E_TIMEOUT;
        if (parse_u64(global("event_wait_rc"), &rc) == OK && rc)
            result = (nvmlReturn_t)rc;
        else if (next_event(set, data))
            result = OK;
        pthread_mutex_unlock(&lock);
        if (result != E_TIMEOUT || waited >= timeout_ms) return result;
        nanosleep(&step, NULL);
    }
}
