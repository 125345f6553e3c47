// Command vlg-oracle tells, for each request body of a corpus, what lk-jwt-service 0.5.0
// makes of it, using Go's own encoding/json. The differential test (tests/differential.rs)
// compares its answers with the strict reader (tests/strict_token) and the filter's own.
//
// Input (a file named on the command line, or stdin): JSON lines
//
//	{"name": "...", "endpoint": "/sfu/get" | "/get_token", "body_b64": "<standard base64>"}
//
// Output (stdout): one JSON line per input line, in order:
//
//	{"ok": false, "error": "..."}
//	{"ok": true, "shape": "legacy" | "new", "room": ..., "slot": ..., "device": ...,
//	 "member_id": ..., "claimed_user": ..., "alias": ..., "identity": ...,
//	 "access_token": ..., "server_name": ...}
//
// The model of lk-jwt-service's reading is package lkjwt's (see its doc comment).
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"

	"vlg-oracle/lkjwt"
)

type corpusEntry struct {
	Name     string `json:"name"`
	Endpoint string `json:"endpoint"`
	Body     []byte `json:"body_b64"` // encoding/json reads []byte as standard base64
}

type outcome struct {
	OK          bool   `json:"ok"`
	Error       string `json:"error,omitempty"`
	Shape       string `json:"shape,omitempty"`
	Room        string `json:"room,omitempty"`
	Slot        string `json:"slot,omitempty"`
	Device      string `json:"device,omitempty"`
	MemberID    string `json:"member_id,omitempty"`
	ClaimedUser string `json:"claimed_user,omitempty"`
	Alias       string `json:"alias,omitempty"`
	Identity    string `json:"identity,omitempty"`
	AccessToken string `json:"access_token,omitempty"`
	ServerName  string `json:"server_name,omitempty"`
}

// keyFolding tells which case folding this Go release applies to keys: Unicode simple
// folding (Go up to 1.20, and current releases) leaves U+0130 'İ' apart from 'I'; the
// ToUpper(ToLower(r)) folding of some releases in between does not.
func keyFolding() string {
	var probe struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(`{"\u0130d":"x"}`), &probe); err == nil && probe.ID == "x" {
		return "key folding: ToUpper(ToLower(r)), İ matches i (the filter follows simple folding: expect mismatches)"
	}
	return "key folding: Unicode simple folding"
}

// checkVectors compares the hashes with the test vectors lk-jwt-service documents.
func checkVectors() error {
	for _, v := range []struct {
		items []string
		want  string
	}{
		{[]string{"!roomid:example.com", "slot1234"}, "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"},
		{[]string{"@alice:example.com", "DEVICE123", "memberABC"}, "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"},
	} {
		if got := lkjwt.HashOfStrings(v.items...); got != v.want {
			return fmt.Errorf("hash of %q is %s, want %s", v.items, got, v.want)
		}
	}
	return nil
}

func judge(endpoint string, body []byte) outcome {
	r, refusal := lkjwt.Read(endpoint, body, false)
	if refusal != nil {
		return outcome{OK: false, Error: refusal.Error()}
	}
	answer := outcome{
		OK:          true,
		Shape:       r.Shape,
		Room:        r.Room,
		Slot:        r.Slot,
		Device:      r.Device,
		MemberID:    r.MemberID,
		ClaimedUser: r.ClaimedUserID,
		Alias:       r.Alias(),
		AccessToken: r.OpenID.AccessToken,
		ServerName:  r.OpenID.MatrixServerName,
	}
	if r.Shape == "new" {
		// claimed_user_id stands in for the verified user: the service issues a token only
		// when they are equal. The legacy identity needs the OpenID answer: left empty.
		answer.Identity = r.Identity(r.ClaimedUserID)
	}
	return answer
}

func main() {
	var input io.Reader = os.Stdin
	switch len(os.Args) {
	case 1:
	case 2:
		f, err := os.Open(os.Args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, "vlg-oracle:", err)
			os.Exit(2)
		}
		defer f.Close()
		input = f
	default:
		fmt.Fprintln(os.Stderr, "usage: vlg-oracle [corpus.jsonl]")
		os.Exit(2)
	}
	fmt.Fprintf(os.Stderr, "vlg-oracle: %s, %s, %s\n", runtime.Version(), jsonImplementation, keyFolding())
	if err := checkVectors(); err != nil {
		fmt.Fprintln(os.Stderr, "vlg-oracle:", err)
		os.Exit(2)
	}

	corpus := json.NewDecoder(bufio.NewReaderSize(input, 1<<20))
	out := bufio.NewWriterSize(os.Stdout, 1<<20)
	defer out.Flush()
	for line := 1; ; line++ {
		var entry corpusEntry
		err := corpus.Decode(&entry)
		if err == io.EOF {
			break
		}
		if err != nil {
			out.Flush()
			fmt.Fprintf(os.Stderr, "vlg-oracle: corpus entry %d: %v\n", line, err)
			os.Exit(2)
		}
		answer, err := json.Marshal(judge(entry.Endpoint, entry.Body))
		if err != nil {
			panic(err)
		}
		out.Write(answer)
		out.WriteByte('\n')
	}
}
