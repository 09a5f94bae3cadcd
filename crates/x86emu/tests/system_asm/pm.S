/* 32-bit protected-mode test code, loaded at 0x20000 (no paging).
 * 0x20000 + v*8: handler for vector v: EDI = v, then HLT. */
	.code32
	.altmacro
	.macro stub n
	.org	\n * 8
	mov	$\n, %edi
	hlt
	.endm
	.set	i, 0
	.rept	256
	stub	%i
	.set	i, i + 1
	.endr

/* 0x20800: INT3 at CPL 0. */
	.org	0x800
	int3
	hlt
/* 0x20810: INT 0x80 at CPL 3 (stack switch to SS0:ESP0). */
	.org	0x810
	mov	$0x77, %ebx
	int	$0x80
	hlt
/* 0x20820: IRETD to CPL 3 and a far call/ret pair there. */
	.org	0x820
	push	$0x2b
	push	$0x60000
	push	$0x202
	push	$0x23
	push	$user32
	iret
user32:
	lcall	$0x23, $far_fn
	mov	%eax, %ebx
	int	$0x80
far_fn:
	mov	$0x55, %eax
	lret
