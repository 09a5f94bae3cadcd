/*
 * randio: direct I/O on a block device, for the disk benchmarks.
 *   randio DEV MODE BS SPAN_MIB OPS
 * MODE is seqread, seqwrite, randread or randwrite. Each op moves BS bytes
 * with O_DIRECT; sequential ops walk the first SPAN_MIB MiB in order (and
 * wrap), random ops pick BS-aligned offsets in it (xorshift, fixed seed).
 * Prints one line: RANDIO MODE bs=BS ops=OPS seconds=S MBps=X iops=Y
 * Built statically by guest/build-disk.sh and carried on the test disk.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: randio DEV seqread|seqwrite|randread|randwrite BS SPAN_MIB OPS\n");
		return 2;
	}
	const char *mode = argv[2];
	long bs = atol(argv[3]);
	uint64_t span = (uint64_t)atol(argv[4]) << 20;
	long ops = atol(argv[5]);
	int write = strstr(mode, "write") != NULL;
	int random = strncmp(mode, "rand", 4) == 0;
	if (bs < 512 || bs % 512 || span < (uint64_t)bs || ops < 1) {
		fprintf(stderr, "randio: bad arguments\n");
		return 2;
	}
	int fd = open(argv[1], (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	void *buf;
	if (posix_memalign(&buf, 4096, bs)) {
		return 1;
	}
	memset(buf, 0x5a, bs);
	uint64_t blocks = span / bs, x = 88172645463325252ull;
	double t0 = now();
	for (long i = 0; i < ops; i++) {
		uint64_t block;
		if (random) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			block = x % blocks;
		} else {
			block = i % blocks;
		}
		ssize_t n = write ? pwrite(fd, buf, bs, block * bs) : pread(fd, buf, bs, block * bs);
		if (n != bs) {
			perror("randio");
			return 1;
		}
	}
	if (write && fdatasync(fd)) {
		perror("fdatasync");
		return 1;
	}
	double s = now() - t0;
	printf("RANDIO %s bs=%ld ops=%ld seconds=%.3f MBps=%.1f iops=%.0f\n", mode, bs, ops, s,
	       (double)bs * ops / s / 1e6, ops / s);
	return 0;
}
