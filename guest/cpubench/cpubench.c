/*
 * cpubench: CPU-bound guest programs with checksums, for issue 15's
 * emu-versus-TCG comparison (bench/src/bin/cpu_programs.rs).
 *
 * Each program does a fixed amount of work (times SCALE), folds its results
 * into a 64-bit checksum and prints one line:
 *
 *   CPUBENCH name=NAME checksum=HEX ns=NANOSECONDS [mips=M]
 *
 * with the time the work took, read from CLOCK_MONOTONIC inside the machine
 * that runs it (the host for the native reference, the guest under a VMM).
 * The checksum depends only on the work, never on the machine: the native
 * run is the reference, and a VMM whose checksum differs computed something
 * wrong. The last line is "CPUBENCH-DONE".
 *
 * Usage: cpubench [SCALE [NAME...]]   (SCALE defaults to 1; no NAME = all)
 *
 * Built static (glibc, gcc -O2, baseline x86-64) by guest/build-cpubench.sh,
 * so glibc's string functions pick their variant from the CPUID that the
 * machine offers, as any distribution binary would.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef unsigned __int128 u128;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Fold a value into a checksum (a 64-bit multiply-xorshift mix). */
static inline uint64_t mix(uint64_t h, uint64_t v)
{
	h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
	h *= 0xff51afd7ed558ccdull;
	return h ^ (h >> 32);
}

static uint64_t fold_buf(uint64_t h, const unsigned char *p, size_t n)
{
	size_t i;
	uint64_t w;
	for (i = 0; i + 8 <= n; i += 8) {
		memcpy(&w, p + i, 8);
		h = mix(h, w);
	}
	for (; i < n; i++)
		h = mix(h, p[i]);
	return h;
}

static uint64_t rng_state;
static inline uint64_t rnd(void)
{
	/* xorshift64* */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dull;
}

/* memcpy, memmove (overlapping both ways) and memset over 1 MiB, with
 * lengths from a few bytes to 64 KiB and every alignment. */
static uint64_t bench_memops(unsigned scale)
{
	const size_t size = 1 << 20;
	unsigned char *a = malloc(size), *b = malloc(size);
	uint64_t h = 0;
	if (!a || !b)
		abort();
	for (size_t i = 0; i < size; i++)
		a[i] = (unsigned char)(i * 131 + (i >> 9));
	memset(b, 0, size);
	rng_state = 0x1234567;
	for (unsigned r = 0; r < 120000 * scale; r++) {
		uint64_t x = rnd();
		size_t len = (x & 0xffff) >> ((x >> 16) & 15); /* mostly short, some long */
		size_t src = (x >> 20) % (size - len);
		size_t dst = (x >> 40) % (size - len);
		switch (r & 3) {
		case 0:
			memcpy(b + dst, a + src, len);
			break;
		case 1:
			memmove(a + dst, a + src, len);
			break;
		case 2:
			memmove(b + src, b + dst, len);
			break;
		default:
			memset(b + dst, (int)(x >> 56), len);
			break;
		}
		if ((r & 4095) == 0)
			h = mix(h, b[dst] | (uint64_t)a[src] << 8 | (uint64_t)len << 16);
	}
	h = fold_buf(h, a, size);
	h = fold_buf(h, b, size);
	free(a);
	free(b);
	return h;
}

/* strlen, strchr, strcmp, memchr and strstr over generated text. */
static uint64_t bench_strings(unsigned scale)
{
	const size_t size = 256 << 10;
	char *t = malloc(size + 1), *u = malloc(size + 1);
	uint64_t h = 0;
	if (!t || !u)
		abort();
	rng_state = 0xabcdef;
	for (size_t i = 0; i < size; i++) {
		uint64_t x = rnd();
		/* words of letters, a NUL every few hundred bytes */
		t[i] = (x % 397) == 0 ? 0 : (x % 7) == 0 ? ' ' : (char)('a' + (x >> 8) % 26);
	}
	t[size] = 0;
	memcpy(u, t, size + 1);
	for (unsigned r = 0; r < 150000 * scale; r++) {
		uint64_t x = rnd();
		size_t at = (x >> 8) % size;
		size_t n = strlen(t + at);
		const char *c = strchr(t + at, 'a' + (int)(x % 26));
		const void *m = memchr(t + at, 'z', n);
		/* a difference somewhere in the next 200 bytes (or none) */
		size_t d = at + (x >> 40) % 200;
		char saved = 0;
		if (d < size && u[d]) {
			saved = u[d];
			u[d] = (char)(saved ^ 1);
		}
		int cmp = strcmp(t + at, u + at);
		if (saved)
			u[d] = saved;
		const char *s = (r & 15) == 0 ? strstr(t + at, "qz") : NULL;
		h = mix(h, n);
		h = mix(h, c ? (uint64_t)(c - t) : 1);
		h = mix(h, m ? (uint64_t)((const char *)m - t) : 2);
		h = mix(h, (uint64_t)(cmp > 0) - (uint64_t)(cmp < 0));
		h = mix(h, s ? (uint64_t)(s - t) : 3);
	}
	free(t);
	free(u);
	return h;
}

/* Sieve of Eratosthenes up to 4 million, repeated: byte array work. */
static uint64_t bench_sieve(unsigned scale)
{
	const size_t n = 4000000;
	unsigned char *composite = malloc(n + 1);
	uint64_t h = 0;
	if (!composite)
		abort();
	for (unsigned r = 0; r < 2 * scale; r++) {
		uint64_t count = 0, sum = 0;
		memset(composite, 0, n + 1);
		for (size_t i = 2; i * i <= n; i++)
			if (!composite[i])
				for (size_t j = i * i; j <= n; j += i)
					composite[j] = 1;
		for (size_t i = 2; i <= n; i++)
			if (!composite[i]) {
				count++;
				sum += i;
			}
		h = mix(h, count);
		h = mix(h, sum);
	}
	free(composite);
	return h;
}

/* Integer loops: table-driven CRC-32, integer division and modulo, shifts
 * and branches (a Collatz walk). */
static uint64_t bench_intloop(unsigned scale)
{
	uint32_t table[256];
	uint64_t h = 0;
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
		table[i] = c;
	}
	static unsigned char buf[64 << 10];
	rng_state = 0x5eed;
	for (size_t i = 0; i < sizeof buf; i++)
		buf[i] = (unsigned char)rnd();
	for (unsigned r = 0; r < 60 * scale; r++) {
		uint32_t crc = 0xffffffffu ^ r;
		for (size_t i = 0; i < sizeof buf; i++)
			crc = table[(crc ^ buf[i]) & 0xff] ^ (crc >> 8);
		h = mix(h, crc);
	}
	for (uint64_t i = 1; i < 40000ull * scale; i++) {
		uint64_t x = i * 2654435761u + 1, steps = 0;
		while (x != 1 && steps < 200) {
			x = x & 1 ? 3 * x + 1 : x >> 1;
			steps++;
		}
		h = mix(h, steps + (i * 1000003u) / (i % 97 + 1) + (i * 7919u) % (i % 13 + 3));
	}
	return h;
}

/* Floating point: double-precision sqrt, division, multiply-add, and a
 * Newton iteration; the result's bits are the checksum (IEEE 754 makes
 * them exact, so any difference is a wrong result). */
static uint64_t bench_fp(unsigned scale)
{
	double acc = 0, acc2 = 1, y = 0.5;
	uint64_t h = 0, bits;
	for (uint64_t i = 1; i <= 3000000ull * scale; i++) {
		double x = (double)i;
		acc += sqrt(x) / (x + 0.5);
		acc2 = acc2 * 0.999999 + 1.0 / sqrt(x + 1.0);
		y = y * (1.5 - 0.5 * x * 1e-7 * y * y); /* Newton step for 1/sqrt */
		if (y != y || y > 1e6 || y < 1e-6)
			y = 0.5;
		if ((i & 0xffff) == 0) {
			memcpy(&bits, &acc, 8);
			h = mix(h, bits);
			memcpy(&bits, &acc2, 8);
			h = mix(h, bits);
			memcpy(&bits, &y, 8);
			h = mix(h, bits);
		}
	}
	memcpy(&bits, &acc, 8);
	h = mix(h, bits);
	return h;
}

/* 128-bit multiplies: 64x64->128 products (MUL), their high halves, and
 * 128-bit modular reduction (libgcc's __umodti3) in a modular power. */
static uint64_t bench_mul128(unsigned scale)
{
	uint64_t h = 0, a = 0x123456789abcdefull, b = 0xfedcba987654321ull;
	u128 acc = 0;
	for (uint64_t i = 0; i < 8000000ull * scale; i++) {
		u128 p = (u128)a * b;
		acc += p ^ (acc >> 3);
		a = (uint64_t)(p >> 64) ^ (uint64_t)p ^ i;
		b = b * 6364136223846793005ull + 1442695040888963407ull;
	}
	h = mix(h, (uint64_t)acc);
	h = mix(h, (uint64_t)(acc >> 64));
	/* modpow with a 61-bit modulus, reduced through 128-bit modulo */
	const uint64_t m = (1ull << 61) - 1;
	for (uint64_t k = 0; k < 4000ull * scale; k++) {
		uint64_t base = (k * 0x9e3779b97f4a7c15ull) % m, e = k | 0x8000000000000000ull, r = 1;
		while (e) {
			if (e & 1)
				r = (uint64_t)(((u128)r * base) % m);
			base = (uint64_t)(((u128)base * base) % m);
			e >>= 1;
		}
		h = mix(h, r);
	}
	return h;
}

/* The guest-side form of bench cpu_loop: `add rax, rcx; dec rcx; jnz`,
 * three instructions an iteration, reported as MIPS. */
static uint64_t cpu_loop_iters;
static uint64_t bench_cpu_loop(unsigned scale)
{
	uint64_t n = 50000000ull * scale, sum = 0;
	cpu_loop_iters = n;
	__asm__ volatile("1: add %%rcx, %%rax\n\tdec %%rcx\n\tjnz 1b" : "+a"(sum), "+c"(n) : : "cc");
	return mix(0, sum);
}

struct program {
	const char *name;
	uint64_t (*run)(unsigned scale);
};

static const struct program programs[] = {
	{ "memops", bench_memops },   { "strings", bench_strings },   { "sieve", bench_sieve }, { "intloop", bench_intloop },
	{ "fp", bench_fp },	      { "mul128", bench_mul128 },     { "cpu_loop", bench_cpu_loop },
};

int main(int argc, char **argv)
{
	unsigned scale = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 10) : 1;
	if (scale == 0) {
		fprintf(stderr, "usage: cpubench [SCALE [NAME...]]\n");
		return 2;
	}
	for (size_t i = 0; i < sizeof programs / sizeof programs[0]; i++) {
		const struct program *p = &programs[i];
		if (argc > 2) {
			int wanted = 0;
			for (int a = 2; a < argc; a++)
				wanted |= strcmp(argv[a], p->name) == 0;
			if (!wanted)
				continue;
		}
		uint64_t start = now_ns();
		uint64_t sum = p->run(scale);
		uint64_t ns = now_ns() - start;
		printf("CPUBENCH name=%s checksum=%016llx ns=%llu", p->name, (unsigned long long)sum, (unsigned long long)ns);
		if (p->run == bench_cpu_loop)
			printf(" mips=%.1f", 3.0 * (double)cpu_loop_iters / ((double)ns / 1e3));
		printf("\n");
		fflush(stdout);
	}
	printf("CPUBENCH-DONE\n");
	return 0;
}
